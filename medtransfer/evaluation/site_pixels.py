"""What a site's images look like before any model: pixel intensities and acquisition tags.

Scanners, protocols and windowing differ between hospitals, and a network notices before a
person does. These summaries use a seeded sample of each site (reading every pixel of a large
archive says little more) and only safe DICOM tags: never a patient tag.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from medtransfer.data.manifest import read_tags

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
SUMMARY_TAGS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "ViewPosition",
    "BodyPartExamined",
    "BitsStored",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)
HISTOGRAM_BINS = 64
_TOP_VALUES = 5


def sample_per_site(manifest: pd.DataFrame, max_per_site: int, seed: int) -> pd.DataFrame:
    """At most ``max_per_site`` rows of each site, drawn with ``seed``, sites in sorted order."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in manifest.groupby("site", sort=True):
        if len(group) > max_per_site:
            keep = np.sort(rng.choice(len(group), max_per_site, replace=False))
            group = group.iloc[keep]
        parts.append(group)
    return pd.concat(parts).reset_index(drop=True)


def intensity_summary(images: np.ndarray) -> dict[str, Any]:
    """Mean, sd, percentiles and a normalised histogram of the pixels the model sees (empty
    for no images); ``image_mean_sd`` tells a site of uniform images from a mixed one."""
    if len(images) == 0:
        return {}
    pixels = images.reshape(-1)
    per_image = images.reshape(len(images), -1).mean(axis=1)
    histogram, _ = np.histogram(pixels, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    percentiles = np.percentile(pixels, PERCENTILES)
    return {
        "images": len(images),
        "mean": float(pixels.mean()),
        "sd": float(pixels.std()),
        **{f"p{q}": float(v) for q, v in zip(PERCENTILES, percentiles, strict=True)},
        "image_mean_sd": float(per_image.std()),
        "histogram": (histogram / histogram.sum()).round(6).tolist(),
    }


def tag_summary(sample: pd.DataFrame) -> dict[str, dict[str, dict[str, int]]]:
    """Most common safe-tag values per site, for the sample's DICOM files (others: nothing)."""
    tags = read_tags(sample["path"].tolist(), list(SUMMARY_TAGS))
    dicom = (tags != "").any(axis=1).to_numpy()
    out: dict[str, dict[str, dict[str, int]]] = {}
    for site in sorted(sample["site"].unique()):
        rows = tags[(sample["site"] == site).to_numpy() & dicom]
        if rows.empty:
            continue
        out[site] = {
            tag: {
                str(v): int(n) for v, n in rows[f"_{tag}"].value_counts().head(_TOP_VALUES).items()
            }
            for tag in SUMMARY_TAGS
            if (rows[f"_{tag}"] != "").any()
        }
    return out
