"""A second hospital from real images: a simulated acquisition shift, for testing adaptation.

Real multi-site data with labels at every site is rare, yet a method that claims to carry a
model from one hospital to another must be measured against the truth at the second one.
``two_site_dataset`` makes that measurable from any MedMNIST-style archive: each split's images
are divided at random **by image** into two halves (no image is at both sites); site ``A``
keeps its images, site ``B``'s go through ``acquisition_shift``, which mimics another scanner:

- **lower resolution**: downsampled by ``scale`` and upsampled back (bilinear), as a detector
  with larger pixels or a stronger lossy compression would give;
- **another detector response curve**: ``gain * x ** gamma + offset``, a different tone curve
  and exposure;
- **more noise**: additive Gaussian noise (``noise_sd``, image range 0-1), seeded per image.

The result is a folder of 8-bit PNG files and a manifest CSV with ``path``, ``label`` (class
index), ``patient_id``, ``site`` and ``split`` columns, so the ordinary spec and manifest path
reads it. No TensorFlow here (PIL and numpy only).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class AcquisitionShift:
    """The second site's acquisition, relative to the first (see the module docstring)."""

    gamma: float = 1.8
    gain: float = 0.75
    offset: float = 0.12
    scale: float = 0.5
    noise_sd: float = 0.04


def acquisition_shift(
    image: np.ndarray,
    shift: AcquisitionShift = AcquisitionShift(),
    *,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """One image [H, W] (or [H, W, C]) float in [0, 1] as the other site would record it;
    ``seed`` (an int or a sequence of ints) seeds its noise."""
    height, width = image.shape[:2]
    low = (max(1, round(width * shift.scale)), max(1, round(height * shift.scale)))
    channels = image[..., None] if image.ndim == 2 else image
    resized = np.stack(
        [
            np.asarray(
                Image.fromarray(channels[..., c].astype(np.float32))  # mode F
                .resize(low, Image.Resampling.BILINEAR)
                .resize((width, height), Image.Resampling.BILINEAR)
            )
            for c in range(channels.shape[-1])
        ],
        axis=-1,
    )
    resized = resized[..., 0] if image.ndim == 2 else resized
    curved = shift.gain * np.clip(resized, 0.0, 1.0) ** shift.gamma + shift.offset
    noise = np.random.default_rng(seed).normal(0.0, shift.noise_sd, curved.shape)
    return np.clip(curved + noise, 0.0, 1.0).astype(np.float32)


def two_site_dataset(
    npz_path: str | Path,
    out_dir: str | Path,
    *,
    shift: AcquisitionShift = AcquisitionShift(),
    seed: int = 0,
    max_per_split: int | None = None,
    sites: tuple[str, str] = ("A", "B"),
) -> Path:
    """Write ``out_dir/images/<site>/<split>/<n>.png`` and ``out_dir/manifest.csv``; return the
    manifest's path.

    Each split of the archive (``<split>_images``, ``<split>_labels``, one label per image) is
    shuffled with ``seed`` and halved: the first half is ``sites[0]`` as recorded, the second
    ``sites[1]`` after ``acquisition_shift``. ``max_per_split`` keeps only that many images of
    each split (before halving), for quick runs. Every image is its own patient.
    """
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    rows = []
    with np.load(npz_path) as archive:
        for split_number, split in enumerate(SPLITS):
            if f"{split}_images" not in archive:
                continue
            images = archive[f"{split}_images"]
            labels = np.asarray(archive[f"{split}_labels"]).reshape(len(images), -1)[:, 0]
            order = rng.permutation(len(images))[:max_per_split]
            half = len(order) // 2
            scale = 65535.0 if images.dtype == np.uint16 else 255.0
            for position, index in enumerate(order):
                site = sites[0] if position < half else sites[1]
                pixels = images[index].astype(np.float32) / scale
                if site == sites[1]:
                    pixels = acquisition_shift(pixels, shift, seed=(seed, split_number, int(index)))
                relative = Path("images") / site / split / f"{int(index):05d}.png"
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.rint(pixels * 255).astype(np.uint8)).save(out / relative)
                rows.append(
                    {
                        "path": relative.as_posix(),
                        "label": int(labels[index]),
                        "patient_id": f"{split}-{int(index)}",
                        "site": site,
                        "split": split,
                    }
                )
    manifest = out / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    return manifest


def describe(shift: AcquisitionShift) -> dict[str, float]:
    """The shift's parameters, for reports."""
    return asdict(shift)
