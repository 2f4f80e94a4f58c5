"""The model's resize without TensorFlow, for decode workers.

A worker that resizes what it decodes sends the parent a 224x224 image (200 KB) instead of a
full radiograph (20 MB as float32), and the parent has nothing left to do. Workers must not
import TensorFlow, so this is TensorFlow's ``tf.image.resize(..., "bilinear", antialias=True)``
(the ``scale_and_translate`` op with a triangle kernel, which the model's ``Resizing`` layer
runs) written with NumPy and SciPy sparse matrices: each axis is one sparse [out, in] matrix of
kernel weights, computed in float32 the way the op computes them. On the DICOM corpus it is
within 5.4e-7 of TensorFlow at 224 px and 1.2e-6 at 32 px (a 60x reduction sums more terms in
another order; tests/test_resize.py), inside the decode-once cache's own 7.7e-6.

Downscaling widens the triangle by the scale factor (that is the antialiasing); upscaling is
plain bilinear with half-pixel centres; a size equal to the input's is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
from scipy import sparse

_ONE, _HALF = np.float32(1.0), np.float32(0.5)


@lru_cache(maxsize=64)
def axis_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The [n_out, n_in] kernel weights of one axis (each row sums to 1), cached: a data set
    of one image size computes them once."""
    inv_scale = _ONE / (np.float32(n_out) / np.float32(n_in))
    kernel_scale = max(inv_scale, _ONE)
    sample = (np.arange(n_out, dtype=np.float32) + _HALF) * inv_scale
    centres = np.arange(n_in, dtype=np.float32) + _HALF
    distance = (centres[None, :] - sample[:, None]) * (_ONE / kernel_scale)
    weights = np.maximum(np.float32(0), _ONE - np.abs(distance))
    weights /= weights.sum(axis=1, keepdims=True)
    return sparse.csr_matrix(weights.astype(np.float32))


def resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """[H, W, C] float32 -> [h, w, C] float32 at ``size`` = (h, w)."""
    rows, cols, channels = image.shape
    height, width = int(size[0]), int(size[1])
    if (rows, cols) == (height, width):
        return image.astype(np.float32)
    flat = np.ascontiguousarray(image, dtype=np.float32).reshape(rows, cols * channels)
    down = axis_weights(rows, height) @ flat  # [h, W*C]
    by_column = down.reshape(height, cols, channels).transpose(1, 0, 2).reshape(cols, -1)
    across = axis_weights(cols, width) @ by_column  # [w, h*C]
    out = across.reshape(width, height, channels).transpose(1, 0, 2)
    return np.ascontiguousarray(out, dtype=np.float32)


def match_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """[H, W] or [H, W, c] float image -> [H, W, channels] (grey repeated, colour averaged)."""
    image = pixels[..., None] if pixels.ndim == 2 else pixels
    have = image.shape[-1]
    if have == channels:
        return image.astype(np.float32, copy=False)
    if have == 1:
        return np.repeat(image, channels, axis=-1).astype(np.float32, copy=False)
    return image.mean(axis=-1, keepdims=True, dtype=np.float32)


def model_pixels(pixels: np.ndarray, size: Sequence[int], channels: int) -> np.ndarray:
    """A decoded image as the model takes it: ``channels`` channels at ``size``, the same
    values as ``to_model_input``. A grey image resizes one plane and then repeats it."""
    image = pixels[..., None] if pixels.ndim == 2 else pixels
    if image.shape[-1] == 1 and channels > 1:
        return match_channels(resize(image, size), channels)
    return resize(match_channels(image, channels), size)
