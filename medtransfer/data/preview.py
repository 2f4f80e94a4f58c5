"""See what training will see: training images beside their augmented versions.

A wrong augmentation (a flipped chest film, a colour shift on CT) is obvious in a picture and
invisible in a config file, so the preview runs the spec's own augmenter, with the batch seeds
training draws, on a few training images of each class.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from matplotlib.figure import Figure

from medtransfer import atomic
from medtransfer.data.augment import batch_seed, make_augmenter
from medtransfer.data.augment_presets import MODALITY_PRESETS
from medtransfer.data.manifest import build_manifest
from medtransfer.data.pipeline import load_split
from medtransfer.spec import Spec


def image_grid_figure(
    images: list[np.ndarray], titles: list[str] | None = None, *, columns: int = 4
) -> Figure:
    """Images in [0, 1] ([H, W], [H, W, 1] or [H, W, 3]) on a grid, grey shown as grey."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(2.4 * columns, 2.6 * rows), dpi=100)
    axes = np.atleast_1d(fig.subplots(rows, columns)).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= len(images):
            continue
        image = images[i][..., 0] if images[i].ndim == 3 and images[i].shape[-1] == 1 else images[i]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        if titles:
            ax.set_title(titles[i], fontsize=8)
    fig.tight_layout()
    return fig


def pick_examples(targets: np.ndarray, count: int) -> np.ndarray:
    """Row indices of ``count`` images taking classes in turn (first images of each class), so a
    rare class is in the picture too. Unknown labels count as no class."""
    classes = np.nan_to_num(targets, nan=0.0).argmax(axis=1)
    queues = [list(np.flatnonzero(classes == c)) for c in np.unique(classes)]
    picked: list[int] = []
    while len(picked) < min(count, len(targets)):
        for queue in queues:
            if queue and len(picked) < count:
                picked.append(queue.pop(0))
    return np.array(picked)


def _label_text(target: np.ndarray, classes: list[str]) -> str:
    known = [(c, float(v)) for c, v in zip(classes, target, strict=True) if not np.isnan(v)]
    hard = [c for c, v in known if v == 1.0]
    if len(hard) == 1 and all(v in (0.0, 1.0) for _, v in known):
        return hard[0]
    return ", ".join(f"{c} {v:.2f}" for c, v in known if v > 0) or "none"


def augment_examples(
    spec: Spec, images: np.ndarray, targets: np.ndarray, *, seed: int | None = None, versions: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``versions`` augmented copies of one batch, as epochs 0, 1, ... would draw them (each
    a batch 0 seed of its epoch); ``[]`` when the spec asks for no augmentation."""
    augment = make_augmenter(spec)
    if augment is None:
        return []
    seed = spec.training.seed if seed is None else seed
    x, y = tf.constant(images), tf.constant(targets)
    out = []
    for epoch in range(versions):
        aug_x, aug_y = augment(x, y, batch_seed(seed, tf.constant(epoch), tf.constant(0)))
        out.append((aug_x.numpy(), aug_y.numpy()))
    return out


def augment_preview_figure(
    spec: Spec,
    *,
    seed: int | None = None,
    count: int = 6,
    versions: int = 4,
    workers: int | None = None,
) -> Figure:
    """A grid: one row per training image, the image as the model gets it, then ``versions``
    augmentations. Titles give the label (a mixed label as its class shares)."""
    images, targets = load_split(spec, build_manifest(spec), "train", workers=workers)
    rows = pick_examples(targets, count)
    images, targets = images[rows], targets[rows]
    augmented = augment_examples(spec, images, targets, seed=seed, versions=versions)
    preset = spec.augmentation.preset or MODALITY_PRESETS[spec.modality]
    grid, titles = [], []
    for i in range(len(rows)):
        grid.append(images[i])
        titles.append(f"original: {_label_text(targets[i], spec.classes)}")
        for epoch, (aug_x, aug_y) in enumerate(augmented):
            grid.append(aug_x[i])
            titles.append(f"epoch {epoch}: {_label_text(aug_y[i], spec.classes)}")
    figure = image_grid_figure(grid, titles, columns=1 + len(augmented))
    figure.suptitle(f"{spec.name}: augmentation preset {preset!r}", fontsize=10)
    figure.tight_layout()
    return figure


def write_augment_preview(
    spec: Spec, out: str | Path, *, seed: int | None = None, count: int = 6, versions: int = 4
) -> Path:
    """The preview as a PNG file, written atomically."""
    png = io.BytesIO()
    figure = augment_preview_figure(spec, seed=seed, count=count, versions=versions)
    figure.savefig(png, format="png", dpi=110)
    atomic.write_bytes(out, png.getvalue())
    return Path(out)
