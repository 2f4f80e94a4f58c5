"""Run an existing albumentations pipeline as a medtransfer augmenter (extra: ``albumentations``).

Teams that already tuned an albumentations pipeline can keep it instead of re-expressing it in
medtransfer's own augmentation (medtransfer/data/augment.py), which runs inside the tf.data graph.
This adapter cannot: albumentations is numpy/OpenCV code, so it runs through
``tf.numpy_function``, one image at a time in Python and under the GIL. It is therefore slower
and scales worse with cores than the graph pipeline; the cost is measured in
benchmarks/RESULTS.md. Use it for compatibility, not speed.

Determinism: each image gets its own numpy Generator and ``random.Random`` derived from the
batch's stateless seed and its index in the batch, installed on the transforms just before they
run, so the output depends on nothing but (seed, image) -- not on global ``random`` /
``np.random`` state, the seed the pipeline was built with, thread scheduling or the process.
"""

from __future__ import annotations

import copy
import os
import random
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import tensorflow as tf

from medtransfer.errors import SpecError

INSTALL_HINT = "pip install 'medtransfer[albumentations]'"
_UINT64 = (1 << 64) - 1
_FORMATS = {".json": "json", ".yaml": "yaml", ".yml": "yaml"}


class AugmentationSpecError(SpecError):
    """A pipeline that cannot augment medtransfer batches, found while tf.data traces the map.

    AutoGraph re-raises errors from traced code as their own type only when that type keeps
    ``Exception.__init__``; any other (SpecError included) becomes a StagingError, which the
    CLI would not report as the user's mistake it is.
    """

    __init__ = Exception.__init__


def _albumentations() -> ModuleType:
    """Import lazily so that ``import medtransfer`` works without the optional extra."""
    # albumentations asks PyPI for a newer version on import (up to 2 s per process, and a
    # request leaving a hospital network); training must not depend on or leak to the internet.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    try:
        import albumentations
    except ImportError as exc:
        raise SpecError(
            f"albumentations augmentation needs the optional extra: {INSTALL_HINT}"
        ) from exc
    return albumentations


def _image_random_state(
    seed0: int, seed1: int, index: int
) -> tuple[np.random.Generator, random.Random]:
    """Independent generators per (batch seed, index): images of one batch must not repeat."""
    entropy = [seed0 & _UINT64, seed1 & _UINT64]  # SeedSequence wants non-negative ints
    numpy_seq, python_seq = np.random.SeedSequence(entropy, spawn_key=(index,)).spawn(2)
    python_seed = int.from_bytes(python_seq.generate_state(4, np.uint32).tobytes(), "little")
    return np.random.default_rng(numpy_seq), random.Random(python_seed)


def _leaves(transform: Any, albumentations: ModuleType) -> list[Any]:
    """Every single transform, including each branch of OneOf/SomeOf, to probe them all."""
    if isinstance(transform, albumentations.BaseCompose):
        return [leaf for child in transform.transforms for leaf in _leaves(child, albumentations)]
    return [transform]


def _size_error(name: str, before: tuple[int, ...], after: tuple[int, ...]) -> str:
    return (
        f"albumentations transform {name} changes the image shape from {before} to {after}; "
        "medtransfer batches need augmentations that keep height, width and channels "
        f"(e.g. A.RandomResizedCrop(size={before[:2]}) instead of a crop or resize)"
    )


class AlbumentationsAugmenter:
    """``augmenter(images, targets, seed) -> (images, targets)`` backed by albumentations.

    ``images`` is a float32 [B, H, W, C] batch in [0, 1] (C = 1 or 3), ``targets`` [B, K] is
    passed through untouched (labels are not geometric), ``seed`` an int64 [2] stateless seed.
    """

    def __init__(self, transform: Any) -> None:
        albumentations = _albumentations()
        if isinstance(transform, list | tuple):
            transform = albumentations.Compose(list(transform))
        if not isinstance(transform, albumentations.BasicTransform | albumentations.BaseCompose):
            raise SpecError(
                "AlbumentationsAugmenter needs an albumentations transform or Compose, "
                f"got {type(transform).__name__}"
            )
        self.transform = transform
        self._albumentations = albumentations
        # Transforms keep per-call state (params, random generators): each tf.data thread gets
        # its own copy so that parallel map calls cannot swap each other's random state.
        self._per_thread = threading.local()
        self._probed: set[tuple[int, int, int]] = set()

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> AlbumentationsAugmenter:
        """Load a pipeline written by ``albumentations.save`` (format from the file suffix)."""
        albumentations = _albumentations()
        path = Path(path)
        data_format = _FORMATS.get(path.suffix.lower())
        if data_format is None:
            raise SpecError(
                f"{path}: an albumentations pipeline file must end in .json, .yaml or .yml"
            )
        if not path.is_file():
            raise SpecError(f"{path}: albumentations pipeline file not found")
        try:
            transform = albumentations.load(str(path), data_format=data_format)
        except Exception as exc:
            raise SpecError(f"{path}: not a loadable albumentations pipeline: {exc}") from exc
        return cls(transform)

    def __repr__(self) -> str:
        return f"AlbumentationsAugmenter({self.transform!r})"

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        images = tf.convert_to_tensor(images)
        if images.dtype != tf.float32:
            raise TypeError(f"augmenter images must be float32 in [0, 1], got {images.dtype.name}")
        shape = images.shape
        if shape.rank != 4 or not shape[1:].is_fully_defined() or shape[-1] not in (1, 3):
            raise ValueError(
                f"augmenter images must be [B, H, W, 1 or 3] with static H, W, C; got {shape}"
            )
        image_shape = (int(shape[1]), int(shape[2]), int(shape[3]))
        # Fail while the pipeline is built, as a SpecError, rather than mid-epoch inside
        # tf.numpy_function, where the exception type is lost in a TF runtime error.
        self._probe(image_shape)
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        augmented = tf.numpy_function(
            self._augment_batch, [images, seed], tf.float32, stateful=False, name="albumentations"
        )
        augmented.set_shape(shape)
        return augmented, targets

    def _probe(self, image_shape: tuple[int, int, int]) -> None:
        """Force-apply every leaf transform once, so even a rarely drawn resize is caught."""
        if image_shape in self._probed:
            return
        image = np.random.default_rng(0).random(image_shape, dtype=np.float32)
        for leaf in _leaves(self.transform, self._albumentations):
            probe = copy.deepcopy(leaf)
            probe.set_random_state(np.random.default_rng(0), random.Random(0))
            name = type(leaf).__name__
            try:
                result = probe(image=image.copy(), force_apply=True)["image"]
            except Exception as exc:
                raise AugmentationSpecError(
                    f"albumentations transform {name} fails on a float32 {image_shape} image "
                    f"in [0, 1]: {type(exc).__name__}: {exc}"
                ) from exc
            if self._restore_shape(np.asarray(result), image_shape).shape != image_shape:
                raise AugmentationSpecError(_size_error(name, image_shape, np.shape(result)))
        self._probed.add(image_shape)

    @staticmethod
    def _restore_shape(image: np.ndarray, image_shape: tuple[int, int, int]) -> np.ndarray:
        # Some transforms hand a single channel back as [H, W]; the batch needs [H, W, 1].
        if image.ndim == 2 and image_shape[2] == 1:
            return image[..., np.newaxis]
        return image

    def _thread_transform(self) -> Any:
        transform = getattr(self._per_thread, "transform", None)
        if transform is None:
            transform = copy.deepcopy(self.transform)
            self._per_thread.transform = transform
        return transform

    def _augment_batch(self, images: np.ndarray, seed: np.ndarray) -> np.ndarray:
        transform = self._thread_transform()
        image_shape = tuple(images.shape[1:])
        seed0, seed1 = (int(value) for value in seed)
        out = np.empty(images.shape, dtype=np.float32)
        for index in range(images.shape[0]):
            transform.set_random_state(*_image_random_state(seed0, seed1, index))
            # A copy: numpy_function inputs may share memory with the input tensor, and some
            # albumentations/albucore ops work in place.
            result = transform(image=images[index].copy())["image"]
            result = self._restore_shape(np.asarray(result), image_shape)
            if result.shape != image_shape:
                raise ValueError(_size_error(type(transform).__name__, image_shape, result.shape))
            out[index] = result
        np.clip(out, 0.0, 1.0, out=out)
        return out
