"""Test-time augmentation inside the graph: the model averaged over fixed views of each image.

The views are deterministic (no randomness at inference): the image itself, a central crop
zoomed back to full size, and, where mirroring keeps an image's meaning, both mirrored. A chest
film is never mirrored: laterality is part of what it shows (see ``spec.RADIOGRAPHS``).
Because the views are Keras layers, a TTA model is saved, evaluated and exported like any other.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from medtransfer.models.ensemble import WeightedAverage
from medtransfer.spec import RADIOGRAPHS

CROP_FRACTION = 0.9


@keras.saving.register_keras_serializable(package="medtransfer")
class MirrorLeftRight(keras.layers.Layer):
    """Images [N, H, W, C] mirrored left to right."""

    def call(self, inputs):
        return tf.reverse(inputs, axis=[2])

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="medtransfer")
class CentralZoom(keras.layers.Layer):
    """The central ``fraction`` of each image, resized back to the image's own size (bilinear,
    antialiased, as the model's Resizing layer): a slight zoom in."""

    def __init__(self, fraction: float = CROP_FRACTION, **kwargs):
        super().__init__(**kwargs)
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)

    def call(self, inputs):
        size = tf.shape(inputs)[1:3]
        cropped = tf.image.central_crop(inputs, self.fraction)
        return tf.image.resize(cropped, size, method="bilinear", antialias=True)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "fraction": self.fraction}


def may_mirror(modality: str) -> bool:
    """Whether mirroring keeps an image of this modality meaningful (not for radiographs)."""
    return modality not in RADIOGRAPHS


def tta_model(model: keras.Model, *, mirror: bool) -> keras.Model:
    """``model`` averaged over its views (2 without mirroring, 4 with); tabular inputs, if any,
    go to every view unchanged."""
    named = model.input if isinstance(model.input, dict) else {"image": model.input}
    inputs = {k: keras.Input(t.shape[1:], dtype=t.dtype, name=k) for k, t in named.items()}
    image = inputs["image"]
    views = [image, CentralZoom(name="tta_zoom")(image)]
    if mirror:
        mirrored = MirrorLeftRight(name="tta_mirror")
        views += [mirrored(view) for view in list(views)]
    outputs = [model({**inputs, "image": v} if len(inputs) > 1 else v) for v in views]
    combined = WeightedAverage([1.0] * len(views), name="probabilities")(outputs)
    return keras.Model(inputs if len(inputs) > 1 else image, combined, name=f"{model.name}_tta")
