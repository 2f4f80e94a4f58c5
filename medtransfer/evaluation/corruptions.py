"""Acquisition corruptions at five severities: how a model degrades under what scanners do.

Each corruption works on the model's input, float32 [N, H, W, C] images in [0, 1] at the
model's size, with TensorFlow ops (``tf.image``, a separable convolution, Keras' affine
transform), and returns images of the same shape in [0, 1]. Severity 0 is the clean image;
1 to 5 distort it more and more (tested: the mean squared difference from the clean image
rises with severity on real images). Random draws (noise, the rotation's direction) are
stateless, from the caller's seed: the same seed gives the same corrupted images.

The levels are meant as plausible acquisition and transfer changes, not destruction: noise up
to an sd of 0.10 (a 26-grey-level sd on 8 bits), blur up to sigma 2 pixels, contrast down to
a fifth, gamma up to 2, JPEG down to quality 10, resolution down to a quarter, and rotations
up to 10 degrees.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

SEVERITIES = (1, 2, 3, 4, 5)


def gaussian_noise(images: tf.Tensor, sd: float, seed: tf.Tensor) -> tf.Tensor:
    """Additive Gaussian noise of standard deviation ``sd``: detector and quantum noise."""
    noise = tf.random.stateless_normal(tf.shape(images), seed=seed, stddev=sd)
    return images + noise


def gaussian_blur(images: tf.Tensor, sigma: float, seed: tf.Tensor) -> tf.Tensor:
    """A Gaussian blur of ``sigma`` pixels (separable, edges mirrored): focus, motion,
    a softer reconstruction kernel."""
    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel = tf.constant(taps / taps.sum(), tf.float32)
    channels = images.shape[-1]
    padded = tf.pad(images, [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    columns = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, channels, 1])
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    return tf.nn.depthwise_conv2d(blurred, columns, [1, 1, 1, 1], "VALID")


def contrast(images: tf.Tensor, factor: float, seed: tf.Tensor) -> tf.Tensor:
    """Contrast scaled by ``factor`` about each image's mean: another window or detector gain."""
    return tf.image.adjust_contrast(images, factor)


def gamma(images: tf.Tensor, exponent: float, seed: tf.Tensor) -> tf.Tensor:
    """``x ** exponent``: another display or detector response curve."""
    return tf.image.adjust_gamma(images, exponent)


def jpeg(images: tf.Tensor, quality: float, seed: tf.Tensor) -> tf.Tensor:
    """JPEG compression at ``quality`` (and the 8-bit quantisation it implies): images that
    went through a teleradiology link or a screenshot."""
    return tf.map_fn(
        lambda image: tf.image.adjust_jpeg_quality(image, int(quality)),
        images,
        fn_output_signature=tf.float32,
    )


def downsample(images: tf.Tensor, factor: float, seed: tf.Tensor) -> tf.Tensor:
    """Down to 1 / ``factor`` of the size (antialiased) and back up: a lower-resolution
    acquisition or a downscaled archive copy."""
    size = tf.shape(images)[1:3]
    small = tf.maximum(tf.cast(tf.round(tf.cast(size, tf.float32) / factor), tf.int32), 1)
    reduced = tf.image.resize(images, small, method="bilinear", antialias=True)
    return tf.image.resize(reduced, size, method="bilinear")


def rotation(images: tf.Tensor, degrees: float, seed: tf.Tensor) -> tf.Tensor:
    """A rotation by ``degrees`` about the centre, clockwise or not at random per image
    (edges mirrored, bilinear): patient or probe positioning."""
    count = tf.shape(images)[0]
    sign = tf.where(tf.random.stateless_uniform([count], seed=seed) < 0.5, -1.0, 1.0)
    angle = sign * (degrees * math.pi / 180)
    cos, sin = tf.cos(angle), tf.sin(angle)
    height = tf.cast(tf.shape(images)[1], tf.float32)
    width = tf.cast(tf.shape(images)[2], tf.float32)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # output (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2)
    zeros = tf.zeros_like(angle)
    transform = tf.stack(
        [cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy, zeros, zeros],
        axis=1,
    )
    return keras.ops.image.affine_transform(
        images, transform, interpolation="bilinear", fill_mode="reflect"
    )


@dataclass(frozen=True)
class Corruption:
    """A corruption and its parameter at severities 1 to 5 (``unit`` says what it means)."""

    name: str
    apply: Callable[[tf.Tensor, float, tf.Tensor], tf.Tensor]
    levels: tuple[float, float, float, float, float]
    unit: str


CORRUPTIONS: dict[str, Corruption] = {
    c.name: c
    for c in (
        Corruption("gaussian_noise", gaussian_noise, (0.01, 0.02, 0.04, 0.06, 0.10), "noise sd"),
        Corruption("blur", gaussian_blur, (0.5, 0.75, 1.0, 1.5, 2.0), "sigma, pixels"),
        Corruption("contrast", contrast, (0.8, 0.65, 0.5, 0.35, 0.2), "contrast factor"),
        Corruption("gamma", gamma, (1.15, 1.3, 1.5, 1.75, 2.0), "gamma exponent"),
        Corruption("jpeg", jpeg, (75, 50, 30, 20, 10), "JPEG quality"),
        Corruption("downsample", downsample, (1.5, 2.0, 2.5, 3.0, 4.0), "size divided by"),
        Corruption("rotation", rotation, (2.0, 4.0, 6.0, 8.0, 10.0), "degrees"),
    )
}


def corrupt(
    images: np.ndarray | tf.Tensor, name: str, severity: int, seed: tuple[int, int] | tf.Tensor
) -> np.ndarray:
    """``images`` under corruption ``name`` at ``severity`` (0: unchanged; 1-5), clipped to
    [0, 1]; ``seed`` is a stateless seed (two integers)."""
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    if severity not in (0, *SEVERITIES):
        raise ValueError(f"severity must be 0 to 5, got {severity}")
    images = tf.convert_to_tensor(images, tf.float32)
    if severity == 0:
        return images.numpy()
    corruption = CORRUPTIONS[name]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int32)
    changed = corruption.apply(images, corruption.levels[severity - 1], seed)
    return tf.clip_by_value(changed, 0.0, 1.0).numpy()
