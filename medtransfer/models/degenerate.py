"""Degenerate models: predictions that (almost) do not vary from one image to the next.

Such a model still trains, evaluates and exports cleanly: AUROC comes out at exactly 0.5 with a
zero-width interval and the operating points at +inf, which a reader can easily take for a
poor but real result. A randomly initialised network whose BatchNormalization statistics have
not caught up, a dead backbone or a diverged run all look like this. Train, evaluate and export
check the predictions they have at hand, record what they found (``degenerate_model``: null or
the record below) and warn with :class:`~medtransfer.errors.DegenerateModelWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np

from medtransfer.errors import DegenerateModelWarning
from medtransfer.spec import reported_classes

SPREAD_TOLERANCE = 1e-6  # max - min of a class's probability across images


def flat_classes(probabilities: np.ndarray, classes: list[str], reported: list[str]) -> list[str]:
    """The reported classes whose probability spreads less than ``SPREAD_TOLERANCE`` across
    the images, or is not finite (a diverged run); none for fewer than two images."""
    if len(probabilities) < 2:
        return []
    flat = []
    for name in reported:
        column = probabilities[:, classes.index(name)]
        if not np.ptp(column) >= SPREAD_TOLERANCE:  # NaN compares False: flagged too
            flat.append(name)
    return flat


def degenerate_model(
    predictions: Mapping[str, np.ndarray],
    classes: list[str],
    task: str,
    positive_class: str | None,
) -> dict | None:
    """None for a model whose predictions vary, else what ``degenerate_model`` records:
    ``{"splits": {split: [class, ...]}, "tolerance": 1e-06, "message": "..."}``.

    ``predictions`` maps a split name to its [N, K] probabilities.
    """
    reported = reported_classes(classes, task, positive_class)
    splits = {}
    for split, probabilities in predictions.items():
        flat = flat_classes(np.asarray(probabilities, dtype=np.float64), classes, reported)
        if flat:
            splits[split] = flat
    if not splits:
        return None
    where = "; ".join(f"{split} split: {', '.join(flat)}" for split, flat in splits.items())
    message = (
        f"degenerate model: its predicted probabilities do not vary across images ({where}; "
        f"max - min < {SPREAD_TOLERANCE:g} or not finite). It ranks every image the same "
        "(AUROC 0.5) and no finite threshold separates the classes: do not use it. Typical "
        "causes: too few training steps for a network trained from scratch (its "
        "BatchNormalization statistics have not settled), a learning rate that is too high, "
        "or labels that carry no signal."
    )
    return {"splits": splits, "tolerance": SPREAD_TOLERANCE, "message": message}


def warn_degenerate(record: dict | None, where: str) -> None:
    """Warn once about a degenerate model (no-op for None); ``where`` says which step found it.

    ``stacklevel=3`` points the warning at the public function (train, evaluate, export) that
    called the step, where a notebook user can see what to act on.
    """
    if record is not None:
        warnings.warn(f"{where}: {record['message']}", DegenerateModelWarning, stacklevel=3)
