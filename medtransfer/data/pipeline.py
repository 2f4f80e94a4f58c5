"""From manifest rows to model-ready tensors and ``tf.data`` pipelines.

Images are decoded once per run, in spawned worker processes (decoding is GIL-bound and
TensorFlow must not be forked), then resized with exactly the op the model's own ``Resizing``
layer uses. Training therefore sees the same pixels a served model computes from the full-size
image, and the in-model resize becomes an identity during training.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer.data.manifest import NPZ_SEPARATOR
from medtransfer.errors import DataError
from medtransfer.io import ImageReadError, load_image


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] or [H, W, c] float image -> [H, W, channels] (grey repeated, colour averaged)."""
    image = pixels[..., None] if pixels.ndim == 2 else pixels
    have = image.shape[-1]
    if have == channels:
        return image.astype(np.float32, copy=False)
    if have == 1:
        return np.repeat(image, channels, axis=-1).astype(np.float32, copy=False)
    return image.mean(axis=-1, keepdims=True, dtype=np.float32)


def resize_images(images: tf.Tensor | np.ndarray, size: Sequence[int]) -> tf.Tensor:
    """The resize used everywhere: bilinear with antialiasing, as the model's Resizing layer."""
    return tf.image.resize(images, tuple(size), method="bilinear", antialias=True)


def to_model_input(images: Sequence[np.ndarray], size: Sequence[int], channels: int) -> np.ndarray:
    """Decoded images (any sizes) -> one float32 batch [N, H, W, C] at the model's size."""
    out = np.empty((len(images), *size, channels), np.float32)
    uniform = len({image.shape for image in images}) == 1
    step = 256 if uniform else 1
    for start in range(0, len(images), step):
        chunk = np.stack([match_channels(im, channels) for im in images[start : start + step]])
        out[start : start + len(chunk)] = resize_images(chunk, size).numpy()
    return out


def _decode_or_error(path: str, window: str | dict, frames: str) -> np.ndarray | ImageReadError:
    """Runs in a worker: return the error instead of raising, so one bad file is one message."""
    try:
        return load_image(path, window=window, frames=frames).pixels
    except ImageReadError as error:
        return error


def _decode_files(
    paths: list[str], window: str | dict, frames: str, workers: int
) -> list[np.ndarray | ImageReadError]:
    args = (paths, [window] * len(paths), [frames] * len(paths))
    if workers == 0 or len(paths) < 8:
        return list(map(_decode_or_error, *args))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(_decode_or_error, *args, chunksize=4))


def _load_npz_rows(refs: dict[int, str]) -> dict[int, np.ndarray]:
    """Rows ``archive.npz#split/index`` -> images, opening each archive and array once."""
    images: dict[int, np.ndarray] = {}
    arrays: dict[tuple[str, str], np.ndarray] = {}
    for position, ref in refs.items():
        archive_path, item = ref.rsplit(NPZ_SEPARATOR, 1)
        split, index = item.split("/")
        if (archive_path, split) not in arrays:
            with np.load(archive_path) as archive:
                arrays[archive_path, split] = archive[f"{split}_images"]
        raw = arrays[archive_path, split][int(index)]
        scale = 65535.0 if raw.dtype == np.uint16 else 255.0
        images[position] = raw.astype(np.float32) / scale
    return images


def load_images(
    df: pd.DataFrame,
    size: Sequence[int],
    channels: int,
    *,
    window: str | dict = "dicom",
    frames: str = "first",
    workers: int | None = None,
) -> np.ndarray:
    """Decode every row of a manifest into one [N, H, W, C] float32 array in [0, 1]."""
    paths = df["path"].tolist()
    npz = {i: p for i, p in enumerate(paths) if NPZ_SEPARATOR in p}
    decoded: dict[int, np.ndarray] = _load_npz_rows(npz)
    files = [i for i in range(len(paths)) if i not in npz]
    if files:
        workers = min(4, os.cpu_count() or 1) if workers is None else workers
        results = _decode_files([paths[i] for i in files], window, frames, workers)
        errors = [
            f"{paths[i]}: {r}"
            for i, r in zip(files, results, strict=True)
            if isinstance(r, ImageReadError)
        ]
        if errors:
            shown = "\n  ".join(errors[:5])
            more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
            raise DataError(f"{len(errors)} image(s) could not be read:\n  {shown}{more}")
        decoded.update(zip(files, results, strict=True))
    return to_model_input([decoded[i] for i in range(len(paths))], size, channels)


def make_dataset(
    images: np.ndarray,
    targets: np.ndarray,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
) -> tf.data.Dataset:
    """A batched, prefetched ``tf.data`` pipeline; shuffling is seeded and differs per epoch."""
    dataset = tf.data.Dataset.from_tensor_slices((images, targets))
    if shuffle:
        dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
