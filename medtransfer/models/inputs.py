"""What a model takes, and how decoded images become it.

The resize here is the model's own (``ModelResizing``: bilinear with antialiasing), so images
resized outside the graph (the decode-once cache, the predictor's batches, the PNG signature)
reach the backbone exactly as images resized inside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

# An image batch, or (with tabular features) named arrays, "image" included.
Inputs = np.ndarray | dict[str, np.ndarray]


def input_count(inputs: Inputs) -> int:
    """How many examples ``inputs`` hold."""
    return len(inputs["image"] if isinstance(inputs, dict) else inputs)


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
