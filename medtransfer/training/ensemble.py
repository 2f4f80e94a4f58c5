"""``medtransfer ensemble``: combine finished runs into a run directory of their own.

The result looks like any run (``run.json``, ``spec.yaml``, ``manifest.csv``, ``model.keras``),
so ``evaluate``, ``export`` and ``score`` take it unchanged. Members must have been trained on
the same data with the same splits: an image one member trained on must not sit in another
member's test split, or the ensemble's test figures would be contaminated.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.models.ensemble import METHODS, ensemble_model
from medtransfer.training.run import (
    MANIFEST_FILE,
    MODEL_FILE,
    RUN_FILE,
    SPEC_FILE,
    open_run,
    package_versions,
)

_MUST_AGREE = ("task", "classes", "positive_class", "data_fingerprint")


def member_weights(val_aurocs: list[float]) -> list[float]:
    """Weights for ``weighted``: each member's validation AUROC above chance (0.5), so a member
    no better than chance gets (almost) no say. Chosen on validation, never on test."""
    above = [max(auc - 0.5, 1e-6) for auc in val_aurocs]
    return [a / sum(above) for a in above]


def create_ensemble(
    run_dirs: list[str | Path],
    out_dir: str | Path,
    *,
    method: str = "mean",
    overwrite: bool = False,
) -> Path:
    """Write an ensemble run of ``run_dirs`` to ``out_dir`` and return its path."""
    if method not in METHODS:
        raise RunError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if len(run_dirs) < 2:
        raise RunError("an ensemble needs at least two runs")
    runs = [open_run(path) for path in run_dirs]
    first = runs[0]
    for run in runs[1:]:
        for key in _MUST_AGREE:
            if run.info.get(key) != first.info.get(key):
                raise RunError(
                    f"{run.path} and {first.path} differ in {key} "
                    f"({run.info.get(key)!r} vs {first.info.get(key)!r}): members must answer "
                    "the same question on the same data"
                )
        if run.info["image"]["channels"] != first.info["image"]["channels"]:
            raise RunError(f"{run.path} takes another number of image channels than {first.path}")
        if (run.info.get("tabular") or []) != (first.info.get("tabular") or []):
            raise RunError(f"{run.path} takes other tabular features than {first.path}")
        if not _same_splits(run.path, first.path):
            raise RunError(f"{run.path} and {first.path} split the data differently")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RunError(f"{out} already exists and is not empty (pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    val_aurocs = [atomic.float_or(run.info["best_val_auroc"]) for run in runs]
    weights = member_weights(val_aurocs) if method == "weighted" else None
    model = ensemble_model(
        [run.load_model() for run in runs],
        method,
        weights=weights,
        multilabel=first.info["task"] == "multilabel",
        name=f"medtransfer_{first.info['name']}_ensemble",
    )
    shutil.copyfile(first.path / SPEC_FILE, out / SPEC_FILE)
    shutil.copyfile(first.path / MANIFEST_FILE, out / MANIFEST_FILE)
    model.save(out / MODEL_FILE)
    copied = ("name", "task", "classes", "positive_class", "image", "tabular", "images")
    info = {key: first.info.get(key) for key in (*copied, "data_fingerprint")}
    info |= {
        "backbone": "ensemble of " + ", ".join(sorted({r.info["backbone"] for r in runs})),
        "weights": "members",
        "seed": [run.info.get("seed") for run in runs],
        "ensemble": {
            "method": method,
            "members": [str(run.path.resolve()) for run in runs],
            "member_best_val_auroc": val_aurocs,
            "weights": weights,
        },
        # the members' own validation figures; the ensemble's are in its evaluation
        "best_val_auroc": float(np.mean(val_aurocs)),
        "best_epoch": None,
        "versions": package_versions(),
    }
    atomic.write_json(out / RUN_FILE, info)
    return out


def _same_splits(a: Path, b: Path) -> bool:
    left = pd.read_csv(a / MANIFEST_FILE, keep_default_na=False)[["path", "split"]]
    right = pd.read_csv(b / MANIFEST_FILE, keep_default_na=False)[["path", "split"]]
    return (
        left.sort_values("path")
        .reset_index(drop=True)
        .equals(right.sort_values("path").reset_index(drop=True))
    )
