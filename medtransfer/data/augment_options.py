"""Augmentation options: the layer behind each one, and how it is applied to a batch.

Every option is a Keras layer with a magnitude, applied to each image with its own probability
(only the chosen images are transformed). Rotation, zoom, translation and shear are the
exception: they are composed into one ``RandomAffine`` so that an image is resampled once.
:func:`option_steps` puts a spec's options in the fixed order of ``augment_presets.OPTIONS``:
geometry, intensity, erasing, policies, then the label-mixing MixUp and CutMix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar

import keras
import tensorflow as tf

from medtransfer.data.augment_layers import (
    AFFINE_OPTIONS,
    Flip,
    RandomAffine,
    RandomGamma,
    RandomGaussianNoise,
    RandomRot90,
)
from medtransfer.data.augment_presets import OPTIONS, Setting
from medtransfer.data.augment_random import StatelessDraws

UNIT_RANGE = (0.0, 1.0)

Applier = Callable[
    [keras.layers.Layer, tf.Tensor, tf.Tensor, StatelessDraws, float],
    tuple[tf.Tensor, tf.Tensor],
]
Step = tuple[Applier, float, keras.layers.Layer]  # applier, probability, layer


def _chosen(images: tf.Tensor, draws: StatelessDraws, probability: float) -> tf.Tensor:
    """Which images of the batch an option applies to: a [B] bool, each with ``probability``."""
    return keras.random.uniform([tf.shape(images)[0]], seed=draws) < probability


def _apply_to_images(layer, images, targets, draws, probability):
    """An image-only option: targets pass through unchanged. Only the chosen images are
    transformed (a probability of 0.3 costs 0.3 of the work), then put back in place."""
    if probability >= 1:
        return _transform(layer, images, draws), targets
    chosen = tf.where(_chosen(images, draws, probability))[:, 0]
    return _replace_rows(images, chosen, lambda subset: _transform(layer, subset, draws)), targets


def _transform(layer, images, draws):
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    return tf.cast(layer.transform_images(images, transformation, training=True), images.dtype)


def _replace_rows(images, rows, transform):
    """``images`` with ``images[rows]`` replaced by ``transform`` of them (skipped when there
    are none: some Keras layers fail on an empty batch)."""
    subset = tf.gather(images, rows)
    out = tf.cond(tf.size(rows) > 0, lambda: transform(subset), lambda: subset)
    return tf.tensor_scatter_nd_update(images, rows[:, None], out)


_POLICY_DRAWS: ContextVar[StatelessDraws] = ContextVar("policy_draws")


class _StatelessPolicy:
    """For Keras' RandAugment and AugMix, which draw from their own generator whatever seed
    they are given: while a batch is traced, their draws come from the batch's seed."""

    def _get_seed_generator(self, backend=None):
        return _POLICY_DRAWS.get()


class StatelessRandAugment(_StatelessPolicy, keras.layers.RandAugment):
    pass


class StatelessAugMix(_StatelessPolicy, keras.layers.AugMix):
    pass


def _apply_policy(layer, images, targets, draws, probability):
    """A policy built for colour images; grey ones go through as repeated RGB, averaged back."""
    grey = images.shape[-1] == 1
    rgb = tf.repeat(images, 3, axis=-1) if grey else images
    token = _POLICY_DRAWS.set(draws)
    try:
        out, targets = _apply_to_images(layer, rgb, targets, draws, probability)
    finally:
        _POLICY_DRAWS.reset(token)
    if grey:  # the channel mean, written so that three equal channels give exactly their value
        first = out[..., :1]
        out = first + ((out[..., 1:2] - first) + (out[..., 2:3] - first)) / 3.0
    return out, targets


def _apply_affine(layer, images, targets, draws, probability):
    """The fused geometry: each component chose its own images; resample only those moved."""
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    moved = tf.where(transformation["moved"])[:, 0]
    matrix = tf.gather(transformation["matrix"], moved)
    return _replace_rows(
        images, moved, lambda subset: layer.transform_images(subset, {"matrix": matrix})
    ), targets


def _mix_targets(targets, partner, own_share, chosen):
    """``own_share * y + (1 - own_share) * y_partner`` for chosen images; others unchanged (so
    an unknown, NaN, partner label cannot leak into an image that was not mixed). A mixed image
    whose partner's label is unknown gets an unknown label."""
    share = own_share[:, None]
    mixed = share * targets + (1.0 - share) * tf.gather(targets, partner)
    return tf.where(chosen[:, None], mixed, targets)


def _apply_mixup(layer, images, targets, draws, probability):
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    chosen = _chosen(images, draws, probability)
    own = tf.where(chosen, tf.cast(transformation["mix_weight"], tf.float32), 1.0)
    partner = tf.cast(transformation["permutation_order"], tf.int32)
    mixed = own[:, None, None, None] * images + (1.0 - own[:, None, None, None]) * tf.gather(
        images, partner
    )
    return mixed, _mix_targets(targets, partner, own, chosen)


def _apply_cutmix(layer, images, targets, draws, probability):
    """CutMix with the label share taken from the pixels actually pasted (Keras' own share is
    computed from the fractional box and can be off by a row or column of pixels)."""
    transformation = layer.get_random_transformation(images, training=True, seed=draws)
    chosen = _chosen(images, draws, probability)
    masks = tf.logical_and(transformation["batch_masks"], chosen[:, None, None, None])
    transformation = {**transformation, "batch_masks": masks}
    out = layer.transform_images(images, transformation, training=True)
    pasted = tf.reduce_mean(tf.cast(masks, tf.float32), axis=[1, 2, 3])
    partner = tf.cast(transformation["permutation_order"], tf.int32)
    return tf.cast(out, images.dtype), _mix_targets(targets, partner, 1.0 - pasted, pasted > 0)


# option -> its layer for a magnitude (what the magnitude means: augment_presets.OPTIONS);
# rotation, zoom, translation and shear share one RandomAffine (see option_steps)
LAYERS: dict[str, Callable[[float], keras.layers.Layer]] = {
    "perspective": lambda m: keras.layers.RandomPerspective(factor=1.0, scale=m),
    "elastic": lambda m: keras.layers.RandomElasticTransform(
        factor=1.0, scale=m, value_range=UNIT_RANGE, fill_mode="constant"
    ),
    "flip_horizontal": lambda m: Flip("horizontal"),
    "flip_vertical": lambda m: Flip("vertical"),
    "rot90": lambda m: RandomRot90(),
    "contrast": lambda m: keras.layers.RandomContrast(m, value_range=UNIT_RANGE),
    "brightness": lambda m: keras.layers.RandomBrightness(m, value_range=UNIT_RANGE),
    "gamma": RandomGamma,
    "saturation": lambda m: keras.layers.RandomSaturation(m, value_range=UNIT_RANGE),
    "hue": lambda m: keras.layers.RandomHue(m, value_range=UNIT_RANGE),
    "noise": RandomGaussianNoise,
    "blur": lambda m: keras.layers.RandomGaussianBlur(
        factor=1.0, kernel_size=3, sigma=m, value_range=UNIT_RANGE
    ),
    "sharpness": lambda m: keras.layers.RandomSharpness(m, value_range=UNIT_RANGE),
    "clahe": lambda m: keras.layers.ContrastLimitedAdaptiveHistogramEqualization(
        value_range=UNIT_RANGE, clip_limit=m
    ),
    "erasing": lambda m: keras.layers.RandomErasing(
        factor=1.0, scale=(0.02, m), fill_value=0.0, value_range=UNIT_RANGE
    ),
    "randaugment": lambda m: StatelessRandAugment(value_range=UNIT_RANGE, num_ops=2, factor=m),
    "augmix": lambda m: StatelessAugMix(value_range=UNIT_RANGE, factor=m),
    "mixup": lambda m: keras.layers.MixUp(alpha=m),
    "cutmix": lambda m: keras.layers.CutMix(factor=m),
}
# how an option's layer is applied when not image-only (_apply_to_images)
APPLIERS: dict[str, Applier] = {
    "randaugment": _apply_policy,
    "augmix": _apply_policy,
    "mixup": _apply_mixup,
    "cutmix": _apply_cutmix,
}


def option_steps(settings: Mapping[str, Setting]) -> list[Step]:
    """The steps of ``settings`` in ``OPTIONS`` order, whatever order the spec listed them in:
    the order is part of what a seed reproduces. The geometry options become one affine step."""
    unknown = sorted(set(settings) - set(LAYERS) - set(AFFINE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown augmentation options {unknown}; known: {list(OPTIONS)}")
    geometry = {n: (s.probability, s.magnitude) for n, s in settings.items() if n in AFFINE_OPTIONS}
    steps: list[Step] = []
    for name in OPTIONS:
        if name not in settings:
            continue
        if name in AFFINE_OPTIONS:
            if geometry:  # all four become one step, where the first of them stands
                steps.append((_apply_affine, 1.0, RandomAffine(**geometry)))
                geometry = {}
            continue
        apply = APPLIERS.get(name, _apply_to_images)
        steps.append((apply, settings[name].probability, LAYERS[name](settings[name].magnitude)))
    return steps
