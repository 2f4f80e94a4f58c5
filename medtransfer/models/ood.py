"""Out-of-distribution scores: how far an image's features lie from the training images'.

The header rules (``medtransfer.scope``) catch a wrong modality or body part; they cannot see a
chest radiograph from a scanner, a hospital or a patient group the model never met. The model's
own features can: the pooled backbone features (the head's input) of the training images are
summarised by their mean and a shrunk (Ledoit-Wolf) covariance, and an image's score is its
Mahalanobis distance to them. The validation images' scores are the reference a new score is
read against (its percentile), since the raw distance has no meaning across models.

``FeatureDistance`` keeps the mean and precision as non-trainable weights, so they are saved
with the model's weights (a 1280-feature precision matrix is 6.5 MB: far too large for a
layer's config) and the export computes the score inside the graph, for TF Serving too.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from keras import ops
from sklearn.covariance import LedoitWolf

from medtransfer.models.inputs import Inputs, input_count, take_rows

MAX_REFERENCE_IMAGES = 5000  # training images whose features make the reference (a sample)


@keras.saving.register_keras_serializable(package="medtransfer")
class FeatureDistance(keras.layers.Layer):
    """Features [N, D] -> Mahalanobis distance [N] to a fixed mean and precision matrix."""

    def __init__(self, dim: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dim = dim
        self.mean = self.add_weight((dim,), initializer="zeros", trainable=False, name="mean")
        self.precision = self.add_weight(
            (dim, dim), initializer="identity", trainable=False, name="precision"
        )

    def set_reference(self, mean: np.ndarray, precision: np.ndarray) -> None:
        self.mean.assign(mean.astype("float32"))
        self.precision.assign(precision.astype("float32"))

    def call(self, features):
        centred = ops.cast(features, "float32") - self.mean
        squared = ops.sum(ops.matmul(centred, self.precision) * centred, axis=-1)
        return ops.sqrt(ops.maximum(squared, 0.0))

    def get_config(self) -> dict:
        return {**super().get_config(), "dim": self.dim}


def pooled_features(model: keras.Model) -> keras.KerasTensor:
    """The head's input in a model ``build_model`` made: the pooled backbone features (with
    tabular features, after their fusion)."""
    return model.get_layer("head_dropout").input


def fit_reference(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and precision of training features; Ledoit-Wolf shrinkage keeps the covariance
    invertible when there are fewer images than features."""
    estimate = LedoitWolf().fit(features.astype(np.float64))
    return estimate.location_, estimate.precision_


def with_ood_score(model: keras.Model, mean: np.ndarray, precision: np.ndarray) -> keras.Model:
    """The classifier with a second output: ``{"probabilities", "ood_score"}`` from one pass."""
    features = pooled_features(model)
    distance = FeatureDistance(int(features.shape[-1]), name="ood_score")
    scores = distance(features)
    distance.set_reference(mean, precision)
    outputs = {"probabilities": model.outputs[0], "ood_score": scores}
    return keras.Model(model.input, outputs, name=f"{model.name}_with_ood")


def reference(
    model: keras.Model, train_inputs: Inputs, val_inputs: Inputs, *, batch_size: int, seed: int
) -> dict[str, np.ndarray]:
    """The OOD reference of a trained classifier: mean and precision of the features of (up to
    ``MAX_REFERENCE_IMAGES`` of) its training images, and its validation images' sorted scores.
    Inputs are arrays, or dicts of arrays for tabular models."""
    features = keras.Model(model.input, pooled_features(model), name="features")
    count = input_count(train_inputs)
    chosen = np.sort(
        np.random.default_rng(seed).choice(count, min(count, MAX_REFERENCE_IMAGES), replace=False)
    )
    sample = take_rows(train_inputs, chosen)
    mean, precision = fit_reference(_predict(features, sample, batch_size))
    distance = FeatureDistance(len(mean))
    distance.set_reference(mean, precision)
    scores = np.sort(ops.convert_to_numpy(distance(_predict(features, val_inputs, batch_size))))
    return {"mean": mean, "precision": precision, "validation_scores": scores}


def _predict(model: keras.Model, inputs: Inputs, batch_size: int) -> np.ndarray:
    """Through ``tf.data``, which takes the string arrays of categorical tabular inputs (Keras'
    own array adapter refuses object arrays)."""
    dataset = tf.data.Dataset.from_tensor_slices(inputs).batch(batch_size)
    return model.predict(dataset, verbose=0)
