"""Linear probes: how good is a representation, measured in seconds.

A frozen backbone's pooled features (plus the spec's tabular features, fused at the feature
level) go into a scikit-learn logistic regression fitted on the training split, its inverse
regularisation ``C`` chosen by validation AUROC; the test split is then judged by the same
clinical report ``evaluate`` writes (``assessment.assessment_from_probabilities``), so a probe
and a fine-tuned model are compared figure for figure. It is the standard measure of what a
pretraining bought (self-supervised vs random vs ImageNet features) and, on a few hundred
images, a baseline that fine-tuning has to beat.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from medtransfer.data.decode_pool import DecodePool
from medtransfer.data.manifest import build_manifest
from medtransfer.data.pipeline import load_split
from medtransfer.data.tabular import numeric_statistics
from medtransfer.errors import SpecError
from medtransfer.evaluation.assessment import assessment_from_probabilities
from medtransfer.evaluation.clinical import ClinicalSettings
from medtransfer.evaluation.report_files import write_report
from medtransfer.models.build import build_encoder
from medtransfer.models.inputs import Inputs
from medtransfer.predictor import ModelInfo
from medtransfer.spec import Spec, TabularFeature

# Inverse regularisation strengths tried; the best by validation AUROC is kept.
PROBE_C = (0.001, 0.01, 0.1, 1.0, 10.0)
PROBE_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ProbeResult:
    """The report's metrics, where it was written, and how the classifier was chosen."""

    metrics: dict
    out_dir: Path
    c: float
    val_auroc: dict[float, float]  # per C tried
    feature_dim: int

    @property
    def auroc(self) -> float | None:
        return self.metrics["auroc"]["macro"]

    def summary(self) -> str:
        m = self.metrics
        auroc = "n/a" if self.auroc is None else f"{self.auroc:.4f}"
        return (
            f"linear probe on {self.feature_dim} features (C={self.c:g}, validation AUROC "
            f"{self.val_auroc[self.c]:.4f}): {m['split']} split, {m['n_images']} images, "
            f"AUROC {auroc}, accuracy {m['accuracy']:.4f}"
        )


def probe(
    spec: Spec,
    weights: str,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    settings: ClinicalSettings | None = None,
    c_values: Sequence[float] = PROBE_C,
) -> ProbeResult:
    """Fit a logistic regression on frozen ``weights`` features and report on the test split.

    ``weights``: ``imagenet`` (Keras's cached file; offline, pass the local file instead),
    ``none`` (random features: the floor any pretraining must clear), a weights file, or
    ``run:RUN`` (a ``train`` or ``pretrain`` run's backbone). Writes the report files of
    ``evaluate`` (metrics.json, predictions.csv, thresholds.json, roc.png, report.html) to
    ``out_dir``; Grad-CAM is left out (there is no end-to-end network to explain).
    """
    if spec.task == "multilabel":
        raise SpecError(f"{spec.origin}: task: probe supports binary and multiclass tasks")
    # the fine-tuning method does not apply to frozen features (and lora needs pretrained ones)
    spec = spec.with_overrides(model={"weights": weights}, training={"fine_tune": {}})
    manifest = build_manifest(spec)
    with DecodePool(workers) as pool:
        splits = {name: load_split(spec, manifest, name, workers=pool) for name in PROBE_SPLITS}
    features = _features(spec, splits)
    labels = {name: np.argmax(splits[name][1], axis=1) for name in PROBE_SPLITS}
    scaler = StandardScaler().fit(features["train"])
    scaled = {name: scaler.transform(x) for name, x in features.items()}
    k = len(spec.classes)
    fitted = {c: _fit(scaled["train"], labels["train"], c, spec.training.seed) for c in c_values}
    val_auroc = {
        c: _auroc(labels["val"], _probabilities(m, scaled["val"], k)) for c, m in fitted.items()
    }
    best = max(c_values, key=lambda c: (val_auroc[c], -c))  # ties: the stronger regularisation
    rows = {name: manifest[manifest["split"] == name] for name in ("val", "test")}
    out = Path(out_dir)
    assessment = assessment_from_probabilities(
        out,
        _model_info(spec),
        rows["test"],
        _probabilities(fitted[best], scaled["test"], k),
        rows["val"],
        _probabilities(fitted[best], scaled["val"], k),
        split="test",
        settings=settings or ClinicalSettings(),
    )
    assessment.metrics["provenance"]["model"] = {
        "kind": "linear probe",
        "folder": out.resolve().name,
        "name": spec.name,
        "seed": spec.training.seed,
        "data_fingerprint": None,  # nothing was trained but the classifier
        "backbone": spec.model.backbone,
        "weights": weights,
        "classifier": "logistic regression on standardised features",
        "C": best,
        "val_auroc_by_C": {str(c): v for c, v in val_auroc.items()},
        "feature_dim": int(features["train"].shape[1]),
    }
    write_report(assessment, out)
    return ProbeResult(assessment.metrics, out, best, val_auroc, int(features["train"].shape[1]))


def _features(spec: Spec, splits: dict[str, tuple[Inputs, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pooled backbone features of every split, with the tabular features appended."""
    keras.utils.set_random_seed(spec.training.seed)  # random features are the seed's
    encoder = build_encoder(spec)
    encoder.trainable = False
    statistics = numeric_statistics(splits["train"][0], spec.tabular) if spec.tabular else {}
    out = {}
    for name, (inputs, _) in splits.items():
        images = inputs["image"] if isinstance(inputs, dict) else inputs
        pooled = encoder.predict(images, batch_size=spec.training.batch_size, verbose=0)
        tabular = [_encode(inputs[f.name], f, statistics) for f in spec.tabular]
        out[name] = np.concatenate([pooled.astype(np.float64), *tabular], axis=1)
    return out


def _encode(
    values: np.ndarray, feature: TabularFeature, statistics: dict[str, tuple[float, float]]
) -> np.ndarray:
    """A tabular feature as the classifier's model encodes it in-graph: numeric standardised
    with a missing flag; categorical one-hot over its values plus an other-or-missing slot."""
    values = np.asarray(values).reshape(-1)
    if feature.type == "numeric":
        mean, std = statistics[feature.name]
        x = values.astype(np.float64)
        missing = np.isnan(x)
        return np.stack([np.where(missing, 0.0, (x - mean) / std), missing.astype(float)], 1)
    known = list(feature.values or [])
    index = [known.index(v) if v in known else len(known) for v in values.astype(str)]
    return np.eye(len(known) + 1)[index]


def _fit(x: np.ndarray, y: np.ndarray, c: float, seed: int) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x, y)


def _probabilities(model: LogisticRegression, x: np.ndarray, k: int) -> np.ndarray:
    """[N, k] class probabilities (a class absent from training gets probability 0)."""
    out = np.zeros((len(x), k))
    out[:, model.classes_] = model.predict_proba(x)
    return out


def _auroc(y: np.ndarray, probabilities: np.ndarray) -> float:
    """One-vs-rest AUROC, macro over the classes that have both outcomes in ``y`` (binary:
    both columns give the same AUROC)."""
    values = [
        roc_auc_score(y == k, probabilities[:, k])
        for k in range(probabilities.shape[1])
        if 0 < (y == k).sum() < len(y)
    ]
    return float(np.mean(values)) if values else float("nan")


def _model_info(spec: Spec) -> ModelInfo:
    return ModelInfo.from_json(
        {
            "name": spec.name,
            "task": spec.task,
            "classes": list(spec.classes),
            "positive_class": spec.positive if spec.task == "binary" else None,
            "image": spec.image.model_dump(mode="json"),
            "tabular": [feature.model_dump(mode="json") for feature in spec.tabular],
        }
    )
