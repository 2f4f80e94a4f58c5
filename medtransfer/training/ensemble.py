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

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.models.ensemble import METHODS, ensemble_model
from medtransfer.models.saved import load_run_model
from medtransfer.rundir import (
    MANIFEST_FILE,
    MODEL_FILE,
    SPEC_FILE,
    Run,
    RunInfo,
    open_run,
    package_versions,
    write_info,
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
            theirs, ours = getattr(run.info, key), getattr(first.info, key)
            if theirs != ours:
                raise RunError(
                    f"{run.path} and {first.path} differ in {key} ({theirs!r} vs {ours!r}): "
                    "members must answer the same question on the same data"
                )
        if run.info.image.channels != first.info.image.channels:
            raise RunError(f"{run.path} takes another number of image channels than {first.path}")
        if run.info.tabular != first.info.tabular:
            raise RunError(f"{run.path} takes other tabular features than {first.path}")
        if not _same_splits(run, first):
            raise RunError(f"{run.path} and {first.path} split the data differently")
    out = Path(out_dir)
    if atomic.is_occupied(out) and not overwrite:
        raise RunError(f"{out} already exists and is not empty (pass --overwrite)")
    out.mkdir(parents=True, exist_ok=True)
    val_aurocs = [atomic.float_or(run.info.best_val_auroc) for run in runs]
    weights = member_weights(val_aurocs) if method == "weighted" else None
    model = ensemble_model(
        [load_run_model(run) for run in runs],
        method,
        weights=weights,
        multilabel=first.info.task == "multilabel",
        name=f"medtransfer_{first.info.name}_ensemble",
    )
    shutil.copyfile(first.path / SPEC_FILE, out / SPEC_FILE)
    shutil.copyfile(first.path / MANIFEST_FILE, out / MANIFEST_FILE)
    model.save(out / MODEL_FILE)
    write_info(out, _ensemble_info(runs, method, val_aurocs, weights))
    return out


def _ensemble_info(
    runs: list[Run], method: str, val_aurocs: list[float], weights: list[float] | None
) -> RunInfo:
    """The first member's description of the data and the question, the members' own."""
    first = runs[0].info
    return RunInfo(
        name=first.name,
        task=first.task,
        classes=first.classes,
        positive_class=first.positive_class,
        image=first.image,
        modality=first.modality,
        tabular=first.tabular,
        images=first.images,
        data_fingerprint=first.data_fingerprint,
        backbone="ensemble of " + ", ".join(sorted({r.info.backbone for r in runs})),
        weights="members",
        seed=[run.info.seed for run in runs],
        ensemble={
            "method": method,
            "members": [str(run.path.resolve()) for run in runs],
            "member_best_val_auroc": val_aurocs,
            "weights": weights,
        },
        # the members' own validation figures; the ensemble's are in its evaluation
        best_val_auroc=float(np.mean(val_aurocs)),
        versions=package_versions(),
    )


def _same_splits(a: Run, b: Run) -> bool:
    left = a.manifest()[["path", "split"]]
    right = b.manifest()[["path", "split"]]
    return (
        left.sort_values("path")
        .reset_index(drop=True)
        .equals(right.sort_values("path").reset_index(drop=True))
    )
