"""What a model was trained on: the training profile that scope checks compare new images with.

A model meets images it was never meant for (another modality, another body part, a scout, a
screenshot), and nothing in its probabilities says so: the quickstart's chest-radiograph model
gives MR images a "finding" probability of 0.999. So a run records, from its training split,
what its images were: the DICOM header values that say what an image is, the sizes and pixel
spacings, and the intensity quantiles of the model's inputs. The profile travels with the run
(``profile.json``) and the export (``assets.extra/profile.json``). It holds counts and ranges
only: no paths, no UIDs, nothing about a patient.

This module imports neither TensorFlow nor Keras: scoring's decode workers use
``normalized_header``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pydicom

PROFILE_VERSION = 2  # 2: per-image intensity samples (intensity.samples)
# What an image is, as its header says; compared with the training profile when scoring.
KIND_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "SOPClassUID",
    "ImageType",
)
SIZE_TAGS = ("Rows", "Columns", "PixelSpacing", "ImagerPixelSpacing")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
_MAX_PIXELS_SAMPLED = 2_000_000  # intensity quantiles from a fixed-seed sample of this many
_MAX_IMAGES_SAMPLED = 2000  # per-image means and SDs kept for drift tests (medtransfer monitor)


def normalized_header(values: Mapping[str, Any]) -> dict[str, str]:
    """The kind tags as comparable text: stripped, upper-case, multi-values joined by ``\\``
    ("" when absent). The same function reads training files and scored files."""
    out = {}
    for tag in KIND_TAGS:
        value = values.get(tag)
        if isinstance(value, list | tuple | pydicom.multival.MultiValue):
            text = "\\".join(str(v).strip() for v in value)
        else:
            text = "" if value is None else str(value).strip()
        out[tag] = text if tag == "SOPClassUID" else text.upper()
    return out


def read_header(path: str) -> dict[str, Any] | None:
    """The kind and size tags of a DICOM file, or None for anything else (a PNG, an npz row, a
    file whose header pydicom cannot parse, anything but a regular file: a FIFO is never
    opened, since opening one blocks until a writer comes). The profile is a summary: one
    unreadable header is one image without a header, never the end of a training run."""
    if not os.path.isfile(path):
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[*KIND_TAGS, *SIZE_TAGS])
    except Exception:  # pydicom raises many types on damaged headers
        return None
    if "SOPClassUID" not in ds and "Modality" not in ds:
        return None
    return {tag: ds.get(tag) for tag in (*KIND_TAGS, *SIZE_TAGS)}


def training_profile(paths: Sequence[str], images: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The profile of the training split: ``paths`` and their model-ready ``images``."""
    headers = [read_header(path) for path in paths]
    dicom = [header for header in headers if header is not None]
    kinds = [normalized_header(header) for header in dicom]
    return {
        "version": PROFILE_VERSION,
        "images": len(paths),
        "dicom_images": len(dicom),
        "header": {tag: _counts(kind[tag] for kind in kinds) for tag in KIND_TAGS},
        "size": {
            "rows": _range(header.get("Rows") for header in dicom),
            "columns": _range(header.get("Columns") for header in dicom),
            "pixel_spacing_mm": _range(_spacing(header) for header in dicom),
        },
        "intensity": _intensity(images, seed),
    }


def _counts(values) -> dict[str, int]:
    return dict(sorted(Counter(v for v in values if v).items()))


def _range(values) -> list[float] | None:
    numbers = [n for n in map(_number, values) if n is not None]
    return [min(numbers), max(numbers)] if numbers else None


def _number(value: Any) -> float | None:
    """A tag value as a number; None for an absent or malformed one (damaged headers)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _spacing(header: Mapping[str, Any]) -> float | None:
    spacing = header.get("PixelSpacing") or header.get("ImagerPixelSpacing")
    try:
        return _number(spacing[0]) if spacing else None
    except (TypeError, IndexError):
        return None


def _intensity(images: np.ndarray, seed: int) -> dict[str, Any]:
    """Quantiles of the model's input pixels and of the per-image means ([0, 1] scale), and
    each image's mean and SD for a sample of the images: what ``medtransfer monitor`` tests a
    scored batch's ``intensity_mean`` and ``intensity_std`` columns against."""
    if len(images) == 0:
        return {"quantiles": QUANTILES, "pixels": None, "image_means": None, "samples": None}
    rng = np.random.default_rng(seed)
    flat = images.reshape(-1)
    if flat.size > _MAX_PIXELS_SAMPLED:
        flat = rng.choice(flat, _MAX_PIXELS_SAMPLED, replace=False)
    means, stds = image_statistics(images)
    chosen = np.sort(rng.choice(len(images), min(len(images), _MAX_IMAGES_SAMPLED), replace=False))
    return {
        "quantiles": list(QUANTILES),
        "pixels": _rounded(np.quantile(flat, QUANTILES)),
        "image_means": _rounded(np.quantile(means, QUANTILES)),
        "samples": {"image_means": _rounded(means[chosen]), "image_stds": _rounded(stds[chosen])},
    }


def image_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD of each image's pixels (``images``: a stack, [N, ...]), in float64: the same
    numbers for the training images here and for scored ones (the ``intensity_*`` columns).
    A chunk at a time, so a large training split is never copied whole."""
    means, stds = np.empty(len(images)), np.empty(len(images))
    for start in range(0, len(images), 64):
        chunk = _one_channel_if_grey(images[start : start + 64])
        flat = chunk.reshape(len(chunk), -1).astype(np.float64)
        means[start : start + 64], stds[start : start + 64] = flat.mean(axis=1), flat.std(axis=1)
    return means, stds


def _one_channel_if_grey(images: np.ndarray) -> np.ndarray:
    """The first channel of an [N, H, W, C] stack whose channels all repeat it, else the stack.

    A grey image fed to an RGB backbone is one plane three times; its mean and SD are those of
    the plane (to float64 rounding), computed at a third of the cost, which matters when
    scoring decodes files in the model's process. Channels are compared as bit patterns: faster
    than as floats, and the same bits are the same values. Colour stops at the first channel
    that differs.
    """
    if images.ndim != 4 or images.shape[-1] == 1:
        return images
    bits = images.view(f"u{images.itemsize}")
    if all((bits[..., c] == bits[..., 0]).all() for c in range(1, images.shape[-1])):
        return images[..., :1]
    return images


def _rounded(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in values]
