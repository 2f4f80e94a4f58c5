"""Training-time augmentation inside the ``tf.data`` graph, built from Keras core layers.

Three decisions shape it, each in a module of its own:

- **Stateless randomness** (``augment_random``): each batch's draws are a pure function of
  (run seed, epoch, batch), so parallel map calls cannot interfere and ``--resume`` stays
  bit-exact.
- **One option, one layer, one probability** (``augment_options``, with the layers Keras lacks
  in ``augment_layers``), in a fixed order, the geometry fused into one resampling.
- **Presets are data** (``augment_presets``, resolved against the spec by ``augment_settings``).
  Radiograph presets never flip: laterality is part of the image's meaning.

This module turns a spec into the one batch function the training pipeline calls.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

import tensorflow as tf

from medtransfer.data.augment_options import option_steps
from medtransfer.data.augment_presets import Setting
from medtransfer.data.augment_random import StatelessDraws, batch_seed
from medtransfer.data.augment_settings import check_settings, resolve_settings

if TYPE_CHECKING:
    from collections.abc import Iterator

    from medtransfer.spec import Spec

# batch_seed: the pipeline keys each batch's augmentation with it, next to the Augmenter it calls
__all__ = ["Augmenter", "ChainedAugmenter", "GraphAugmenter", "batch_seed", "make_augmenter"]


class Augmenter(Protocol):
    """What the training pipeline calls on each batch (graph or albumentations)."""

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]: ...


@contextmanager
def _python_random(seed: int) -> Iterator[None]:
    """Keras' AugMix picks each chain's operations with Python's ``random`` while the graph is
    traced (once per pipeline); seeding that choice makes runs repeat it. Global state is
    restored afterwards."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


class GraphAugmenter:
    """The spec's options as one batch function for ``Dataset.map`` (see :class:`Augmenter`)."""

    def __init__(self, settings: Mapping[str, Setting], seed: int = 0) -> None:
        self._steps = option_steps(settings)
        self.settings = dict(settings)
        self._seed = seed

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        draws = StatelessDraws(seed)
        with _python_random(self._seed):
            for apply, probability, layer in self._steps:
                if not layer.built:
                    layer.build(images.shape)
                images, targets = apply(layer, images, targets, draws, probability)
        return tf.clip_by_value(images, 0.0, 1.0), targets


class ChainedAugmenter:
    """The graph options, then a user's albumentations pipeline."""

    def __init__(self, *augmenters: Augmenter) -> None:
        self._augmenters = augmenters

    def __call__(
        self, images: tf.Tensor, targets: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        for index, augmenter in enumerate(self._augmenters):
            images, targets = augmenter(
                images, targets, tf.random.experimental.stateless_fold_in(seed, index)
            )
        return images, targets


def make_augmenter(spec: Spec) -> Augmenter | None:
    """The spec's training augmentation, or ``None`` when it asks for none."""
    settings = resolve_settings(spec)
    check_settings(settings, spec)
    augmenters: list[Augmenter] = []
    if settings:
        augmenters.append(GraphAugmenter(settings, seed=spec.training.seed))
    if spec.augmentation.albumentations is not None:
        from medtransfer.data.albumentations_adapter import AlbumentationsAugmenter

        augmenters.append(AlbumentationsAugmenter.from_file(spec.augmentation.albumentations))
    if not augmenters:
        return None
    return augmenters[0] if len(augmenters) == 1 else ChainedAugmenter(*augmenters)
