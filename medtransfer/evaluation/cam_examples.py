"""The report's Grad-CAM panel: which cases it explains, and what their maps are measured from.

A reader judges a model by its telling cases, the most confident hits and false alarms and the
clearest misses, not by a random handful. Their heatmaps are measured from validation images
without the class: plain Grad-CAM of a network trained from scratch points at what every image
shares (``benchmarks/RESULTS.md``, "Grad-CAM pointing game").
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medtransfer.data.pipeline import load_images, with_tabular
from medtransfer.evaluation.gradcam import grad_cam, localising_layer
from medtransfer.evaluation.plots import cam_overlay_figure
from medtransfer.models.inputs import Inputs
from medtransfer.predictor import ModelInfo, Predictor

MAX_REFERENCE_IMAGES = 64


def explained_examples(
    probabilities: np.ndarray, y: np.ndarray, k: int, threshold: float, n: int
) -> list[tuple[str, int]]:
    """(kind, row) of the most confident true positives and false positives and the clearest
    false negatives for class ``k`` at ``threshold``: the cases a reader wants to see."""
    p, positive = probabilities[:, k], y[:, k] == 1
    called = p >= threshold
    picks = []
    for kind, mask, descending in (
        ("TP", positive & called, True),
        ("FP", ~positive & called & ~np.isnan(y[:, k]), True),
        ("FN", positive & ~called, False),
    ):
        index = np.flatnonzero(mask)
        order = index[np.argsort(-p[index] if descending else p[index], kind="stable")]
        picks += [(kind, int(i)) for i in order[:n]]
    return picks


def gradcam_examples(
    predictor: Predictor,
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    y: np.ndarray,
    class_name: str,
    threshold: float,
    n: int,
    reference_rows: pd.DataFrame,
) -> tuple[Figure, str] | None:
    """Grad-CAM overlays of ``explained_examples`` and a caption, or None for a model without
    one backbone (ensembles, TTA models) or an export (no layers left to explain).

    Heatmaps are measured from the mean features of ``reference_rows`` (validation images
    without the class, up to 64 spread over the split), at ``localising_layer``: the coarse
    last map of a small input cannot point at a finding."""
    model = getattr(predictor, "model", None)
    if model is None or "backbone" not in [layer.name for layer in model.layers]:
        return None
    info, k = predictor.info, predictor.info.class_names.index(class_name)
    picks = explained_examples(probabilities, y, k, threshold, n)
    if not picks:
        return None
    images, explained = _inputs(info, rows.iloc[[i for _, i in picks]])
    reference, baseline = None, "plain (no validation images without it)"
    if len(reference_rows):
        spread = np.linspace(0, len(reference_rows) - 1, MAX_REFERENCE_IMAGES).astype(int)
        normal = reference_rows.iloc[np.unique(spread)]
        reference = _inputs(info, normal)[1]
        baseline = f"measured from the mean of {len(normal)} validation images without it"
    layer = localising_layer(model)
    heatmaps = grad_cam(model, explained, k, layer=layer, reference=reference)
    titles = [f"{kind} P={probabilities[i, k]:.2f}" for kind, i in picks]
    caption = (
        f"Grad-CAM ({class_name}) at {layer}, {baseline}: most confident TP, FP and clearest FN"
    )
    return cam_overlay_figure(images, heatmaps, titles, columns=min(len(picks), 2 * n)), caption


def _inputs(info: ModelInfo, chosen: pd.DataFrame) -> tuple[np.ndarray, Inputs]:
    """The chosen rows' images, and the model's inputs made of them."""
    images = load_images(
        chosen, info.image_size, info.channels, window=info.window, frames=info.frames, workers=0
    )
    return images, with_tabular(images, chosen, info.tabular)
