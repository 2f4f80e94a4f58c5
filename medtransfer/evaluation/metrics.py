"""Discrimination metrics from labels and predicted probabilities (scikit-learn underneath)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def _auroc(y: np.ndarray, p: np.ndarray) -> float | None:
    """AUROC over the known labels, or None when they hold only one class (then undefined)."""
    known = ~np.isnan(y)
    if len(np.unique(y[known])) < 2:
        return None
    return float(roc_auc_score(y[known], p[known]))


def compute_metrics(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    classes: list[str],
    task: str,
    positive_class: str | None = None,
) -> dict:
    """AUROC per class and macro, accuracy and prevalence for one split.

    ``y_true`` is the [N, K] one-hot (or multi-hot) target matrix, ``probabilities`` the model's
    [N, K] output. For a binary task the headline AUROC is the positive class's; for the others
    it is the unweighted mean over classes whose AUROC is defined. Unknown multilabel labels
    (NaN) are left out of every figure, label by label.
    """
    y = np.asarray(y_true, dtype=np.float32)
    p = np.asarray(probabilities, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 2 or y.shape[1] != len(classes):
        raise ValueError(
            f"labels {y.shape} and probabilities {p.shape} must both be [N, {len(classes)}]"
        )
    per_class = {name: _auroc(y[:, k], p[:, k]) for k, name in enumerate(classes)}
    if task == "binary":
        macro = per_class[positive_class or classes[-1]]
        accuracy = float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
    else:
        defined = [v for v in per_class.values() if v is not None]
        macro = float(np.mean(defined)) if defined else None
        accuracy = (
            float(np.mean(((p >= 0.5) == (y >= 0.5))[~np.isnan(y)]))
            if task == "multilabel"
            else float(np.mean(np.argmax(p, 1) == np.argmax(y, 1)))
        )
    return {
        "task": task,
        "classes": list(classes),
        "positive_class": positive_class if task == "binary" else None,
        "n_images": len(y),
        "prevalence": {name: float(np.nanmean(y[:, k])) for k, name in enumerate(classes)},
        "unknown_labels": {name: int(np.isnan(y[:, k]).sum()) for k, name in enumerate(classes)},
        "auroc": {"macro": macro, "per_class": per_class},
        "accuracy": accuracy,
        "accuracy_definition": (
            "mean per-label agreement at threshold 0.5" if task == "multilabel" else "argmax"
        ),
    }
