"""Preprocessing layers that live inside the model graph.

They are ordinary Keras layers with ``get_config`` (no ``Lambda``), so a saved ``.keras`` model
reloads with ``safe_mode=True`` and an exported SavedModel carries the exact preprocessing the
model was trained with: serving cannot disagree with training.
"""

from __future__ import annotations

import keras
from keras import ops

_IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="medtransfer")
class ModelResizing(keras.layers.Resizing):
    """Keras' ``Resizing`` with a ``training`` argument that defaults to None.

    Keras' preprocessing layers declare ``training=True``; as a model's first layer that default
    becomes the whole call's, so a bare ``model(x)`` ran BatchNormalization in training mode
    (batch statistics, and the moving averages overwritten). Resizing itself is deterministic.
    """

    def call(self, inputs, training=None):
        return super().call(inputs, training=bool(training))


@keras.saving.register_keras_serializable(package="medtransfer")
class ChannelAdapter(keras.layers.Layer):
    """Turn 1-channel images into the 3 channels an ImageNet backbone expects (or back).

    Repeating grey into R, G and B is equivalent to summing the pretrained stem's kernels over
    colour, so pretrained weights keep working without the user converting anything.
    """

    def __init__(self, channels: int = 3, **kwargs):
        super().__init__(**kwargs)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def call(self, inputs):
        have = inputs.shape[-1]
        if have == self.channels:
            return inputs
        if have == 1:
            return ops.repeat(inputs, self.channels, axis=-1)
        return ops.mean(inputs, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.channels)

    def get_config(self):
        return {**super().get_config(), "channels": self.channels}


@keras.saving.register_keras_serializable(package="medtransfer")
class BackbonePreprocessing(keras.layers.Layer):
    """Map images in [0, 1] to what a pretrained backbone was trained on.

    ``caffe``: 0..255, RGB->BGR, ImageNet mean subtracted (ResNet v1). ``torch``: ImageNet
    mean/std (DenseNet). ``tf``: [-1, 1] (ResNetV2). ``raw255``: 0..255 only, for backbones that
    normalise inside themselves (EfficientNet, MobileNetV3).
    """

    def __init__(self, mode: str = "raw255", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "torch", "tf", "raw255"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        if self.mode == "raw255":
            return x * 255.0
        if self.mode == "tf":
            return x * 2.0 - 1.0
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_IMAGENET_MEAN_RGB, dtype=x.dtype)
            std = ops.convert_to_tensor(_IMAGENET_STD_RGB, dtype=x.dtype)
            return (x - mean) / std
        bgr = ops.flip(x * 255.0, axis=-1)
        return bgr - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=x.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="medtransfer")
class StandardizeWithMissing(keras.layers.Layer):
    """A numeric tabular input [N, 1] (NaN = missing) -> [N, 2]: standardised value, missing flag.

    A missing value reads as the training mean (0 after standardising) and sets the flag, so the
    head can learn what missingness itself means (an age left blank is not an average age). The
    mean and standard deviation are the training split's, kept in the config: serving
    standardises exactly as training did.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}")
        self.mean, self.std = float(mean), float(std)

    def call(self, inputs):
        x = ops.cast(inputs, self.compute_dtype)
        missing = ops.isnan(x)
        value = ops.where(missing, ops.zeros_like(x), (x - self.mean) / self.std)
        return ops.concatenate([value, ops.cast(missing, x.dtype)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "std": self.std}


@keras.saving.register_keras_serializable(package="medtransfer")
class TemperatureScaling(keras.layers.Layer):
    """Softmax probabilities [N, K] -> softmax(log(p) / T): temperature scaling (Guo et al.
    2017) applied to a model's output, with T fitted on the validation split at evaluation.

    ``log(p)`` equals the logits up to a per-row constant, which softmax ignores; T > 1 softens
    an overconfident model without changing any ranking or argmax.
    """

    def __init__(self, temperature: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def call(self, inputs):
        logits = ops.log(ops.clip(ops.cast(inputs, "float32"), 1e-12, 1.0))
        return ops.softmax(logits / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
