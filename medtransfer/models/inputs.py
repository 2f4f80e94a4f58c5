"""What a model takes, and how decoded images become it.

The resize is the model's own (``ModelResizing``: bilinear with antialiasing), so images resized
outside the graph (decode workers, the decode-once cache, the predictor's batches, the PNG
signature) reach the backbone as images resized inside it. Outside the graph it runs in NumPy
(``medtransfer.io.resize``, within 1.2e-6 of TensorFlow's op and faster on a CPU); in the graph it
is TensorFlow's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from medtransfer.io.resize import model_pixels

# An image batch, or (with tabular features) named arrays, "image" included.
Inputs = np.ndarray | dict[str, np.ndarray]


def input_count(inputs: Inputs) -> int:
    """How many examples ``inputs`` hold."""
    return len(inputs["image"] if isinstance(inputs, dict) else inputs)


def take_rows(inputs: Inputs, rows: slice | np.ndarray) -> Inputs:
    """Some examples of ``inputs`` (a slice or an index array), every named input alike."""
    if isinstance(inputs, dict):
        return {name: values[rows] for name, values in inputs.items()}
    return inputs[rows]


def resize_images(images: tf.Tensor | np.ndarray, size: Sequence[int]) -> tf.Tensor:
    """TensorFlow's resize, as the model's Resizing layer runs it (bilinear, antialiased): for
    graphs (the export's PNG signature); outside them ``to_model_input`` is the same in NumPy."""
    return tf.image.resize(images, tuple(size), method="bilinear", antialias=True)


def to_model_input(images: Sequence[np.ndarray], size: Sequence[int], channels: int) -> np.ndarray:
    """Decoded images (any sizes) -> one float32 batch [N, H, W, C] at the model's size."""
    out = np.empty((len(images), *size, channels), np.float32)
    for i, image in enumerate(images):
        out[i] = model_pixels(image, size, channels)
    return out
