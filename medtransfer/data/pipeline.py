"""From manifest rows to model-ready tensors and ``tf.data`` pipelines.

Images are decoded once, by a ``DecodePool`` (``medtransfer.data.decode_pool``: spawned worker
processes that decode and resize, since decoding is GIL-bound and TensorFlow must not be
forked), and kept in the decode-once cache (``medtransfer.data.cache``) for later epochs, runs
and evaluations. They are resized as the model's own ``Resizing`` layer resizes (in NumPy,
within 1.2e-6 of it). Training therefore sees the same pixels a served model computes from the
full-size image, and the in-model resize becomes an identity during training.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import tensorflow as tf
from tqdm import tqdm

from medtransfer.data.augment import Augmenter, batch_seed
from medtransfer.data.cache import CacheSettings, ShardCache, UnreadableImages
from medtransfer.data.decode_pool import DecodePool, Result, Workers, pool_for
from medtransfer.data.manifest import NPZ_SEPARATOR, targets
from medtransfer.data.tabular import column_name, model_inputs
from medtransfer.errors import DataError
from medtransfer.io import ImageReadError
from medtransfer.models.inputs import Inputs, input_count, to_model_input

if TYPE_CHECKING:
    from medtransfer.spec import Spec, TabularFeature


def _decode_files(paths: list[str], settings: CacheSettings, pool: DecodePool) -> Iterator[Result]:
    """Each file's model-size pixels or its error, in order (a seam tests count decodes at)."""
    return pool.decode(paths, settings.size, settings.channels, settings.window, settings.frames)


class _ShardDecoder:
    """Files -> float32 [n, H, W, C] at ``settings``, as the cache's ``Decoder``.

    With ``progress``, ``expect(n)`` opens a progress bar on stderr (images and images/s) that
    each decoded image advances; a load with nothing to decode shows none.
    """

    def __init__(
        self,
        settings: CacheSettings,
        pool: DecodePool,
        *,
        progress: bool = False,
        label: str = "decoding images",
    ) -> None:
        self.settings, self._pool = settings, pool
        self._progress, self._label = progress, label
        self._bar: tqdm | None = None

    def __enter__(self) -> _ShardDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def expect(self, n_images: int) -> None:
        """Images about to be decoded: the progress bar's total (opens it, if wanted)."""
        if self._progress and self._bar is None:
            self._bar = tqdm(
                total=n_images,
                desc=self._label,
                unit=" images",
                file=sys.stderr,
                dynamic_ncols=True,
            )

    def __call__(self, paths: list[str]) -> np.ndarray:
        out = np.empty((len(paths), *self.settings.image_shape), np.float32)
        errors: list[str] = []
        bad: list[str] = []
        for i, (path, result) in enumerate(
            zip(paths, _decode_files(paths, self.settings, self._pool), strict=True)
        ):
            if isinstance(result, ImageReadError):
                errors.append(f"{path}: {result}")
                bad.append(path)
            else:
                out[i] = result
            if self._bar is not None:
                self._bar.update()
        if errors:
            raise UnreadableImages(errors, bad)
        return out


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
    workers: Workers = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool | None = None,
    label: str = "decoding images",
) -> np.ndarray:
    """Decode every row of a manifest into one [N, H, W, C] float32 array in [0, 1].

    File rows (DICOM, PNG, ...) go through the decode-once cache (``medtransfer.data.cache``,
    under ``cache_dir``, default ``$MEDTRANSFER_CACHE`` or ``~/.cache/medtransfer``), so a
    second run or an evaluation after training reads shards instead of decoding again; cached
    pixels are within 7.7e-6 of a fresh decode. ``use_cache=False`` decodes everything in memory
    and writes nothing. npz rows are read from their archive (already decoded, never cached).

    ``workers``: decode processes (default: one per usable core; 0 decodes in this process),
    or a ``DecodePool`` that several loads share. ``progress`` shows a bar on stderr while
    files are decoded (cached images are not counted); the default, None, shows it only when
    stderr is a terminal, so logs stay clean.
    """
    paths = df["path"].tolist()
    npz = {i: p for i, p in enumerate(paths) if NPZ_SEPARATOR in p}
    files = [i for i in range(len(paths)) if i not in npz]
    settings = CacheSettings((int(size[0]), int(size[1])), channels, window, frames)
    shown = _stderr_is_a_terminal() if progress is None else progress
    with (
        pool_for(workers) as pool,
        _ShardDecoder(settings, pool, progress=shown, label=label) as decoder,
    ):
        file_images = _load_file_rows([paths[i] for i in files], decoder, cache_dir, use_cache)
    if not npz:
        return file_images
    out = np.empty((len(paths), *size, channels), np.float32)
    decoded = _load_npz_rows(npz)
    out[list(decoded)] = to_model_input(list(decoded.values()), size, channels)
    out[files] = file_images
    return out


def load_split(
    spec: Spec, manifest: pd.DataFrame, split: str, *, workers: Workers = None
) -> tuple[Inputs, np.ndarray]:
    """One split of a manifest as the spec's model sees it: inputs and [N, K] targets.

    The inputs are the image array, or for a spec with tabular features the dict of named
    inputs (``image`` plus one [N, 1] array per feature).
    """
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise DataError(f"{spec.origin}: no images in the {split} split")
    images = load_spec_images(spec, rows, workers=workers, label=f"decoding {split} images")
    return with_tabular(images, rows, spec.tabular), targets(rows, spec.classes)


def load_spec_images(
    spec: Spec, rows: pd.DataFrame, *, workers: Workers = None, label: str = "decoding images"
) -> np.ndarray:
    """The images of manifest ``rows`` at the spec's size, channels, window and frame policy
    (``label``: the decode progress bar's, when there is one)."""
    return load_images(
        rows,
        spec.image.size,
        spec.image.channels,
        window=spec.image.window_policy,
        frames=spec.image.frames,
        workers=workers,
        label=label,
    )


def with_tabular(
    images: np.ndarray, rows: pd.DataFrame, features: Sequence[TabularFeature]
) -> Inputs:
    """The model inputs for ``images`` and their manifest ``rows``: the images alone, or with
    the given tabular features."""
    if not features:
        return images
    values = {f.name: rows[column_name(f.name)] for f in features}
    return {"image": images, **model_inputs(values, features)}


def _load_file_rows(
    paths: list[str], decode: _ShardDecoder, cache_dir: str | Path | None, use_cache: bool
) -> np.ndarray:
    if not use_cache:
        if paths:
            decode.expect(len(paths))
        return decode(paths)
    return ShardCache(cache_dir).load(paths, decode.settings, decode, on_decode=decode.expect)


def _stderr_is_a_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced by an object without it, or closed
        return False


def make_dataset(inputs: Inputs, targets: np.ndarray, *, batch_size: int) -> tf.data.Dataset:
    """Batched, prefetched, in order: for validation, evaluation and prediction."""
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets))
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def make_training_dataset(
    inputs: Inputs,
    targets: np.ndarray,
    *,
    batch_size: int,
    seed: int,
    epochs: range,
    augment: Augmenter | None = None,
) -> tf.data.Dataset:
    """The batches of ``epochs``, one after another; fit with ``steps_per_epoch``.

    Each epoch is its own permutation, drawn statelessly from ``(seed, epoch)``.
    ``Dataset.shuffle`` instead keys its order on how many times this process has iterated
    it, so a run resumed at epoch k would see a different order from an uninterrupted run.
    ``augment`` runs on each batch with a seed of its own, from ``(seed, epoch, batch)``, in a
    parallel map: what a batch looks like does not depend on when or where it is made.
    The last batch of an epoch may be short; batches never straddle epochs. Only the image of
    tabular inputs is augmented.
    """
    named = inputs if isinstance(inputs, dict) else {"image": inputs}
    inputs_t, targets_t = {k: tf.constant(v) for k, v in named.items()}, tf.constant(targets)
    count = input_count(inputs)

    def epoch_batches(epoch: tf.Tensor) -> tf.data.Dataset:
        keys = tf.random.stateless_uniform([count], seed=tf.stack([tf.cast(seed, tf.int64), epoch]))
        order = tf.data.Dataset.from_tensor_slices(tf.argsort(keys)).batch(batch_size)
        return order.enumerate().map(lambda batch, index: (epoch, batch, index))

    def load(epoch: tf.Tensor, batch: tf.Tensor, index: tf.Tensor) -> tuple[object, tf.Tensor]:
        x = {k: tf.gather(v, index) for k, v in inputs_t.items()}
        y = tf.gather(targets_t, index)
        if augment:
            x["image"], y = augment(x["image"], y, batch_seed(seed, epoch, batch))
        return (x if isinstance(inputs, dict) else x["image"]), y

    batches = tf.data.Dataset.range(epochs.start, epochs.stop).flat_map(epoch_batches)
    return batches.map(load, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
