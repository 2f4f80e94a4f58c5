"""Ensembles of trained runs as one Keras model: evaluated, exported and served like any other.

Members keep their own in-graph preprocessing (resize, channels, backbone normalisation), so
runs trained at different input sizes or with different backbones combine, as long as they
answer the same question (same classes, task and image channels). Combining layers are plain
Keras layers with ``get_config``: the ensemble saves as ``.keras``, reloads with
``safe_mode=True`` and exports to one SavedModel.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import ops

METHODS = ("mean", "weighted", "vote")


@keras.saving.register_keras_serializable(package="medtransfer")
class WeightedAverage(keras.layers.Layer):
    """Member probabilities [N, K] each -> their weighted mean (weights sum to 1)."""

    def __init__(self, weights: Sequence[float] = (), **kwargs):
        super().__init__(**kwargs)
        total = float(sum(weights))
        if not weights or total <= 0 or min(weights) < 0:
            raise ValueError(f"weights must be non-negative with a positive sum, got {weights}")
        self.member_weights = [float(w) / total for w in weights]

    def call(self, inputs):
        if len(inputs) != len(self.member_weights):
            raise ValueError(f"{len(inputs)} members but {len(self.member_weights)} weights")
        return sum(
            w * ops.cast(x, "float32") for w, x in zip(self.member_weights, inputs, strict=True)
        )

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "weights": self.member_weights}


@keras.saving.register_keras_serializable(package="medtransfer")
class MajorityVote(keras.layers.Layer):
    """Member probabilities -> the share of members voting for each class.

    A softmax member votes for its argmax class; a multilabel member (``multilabel=True``)
    votes for each label it predicts at >= 0.5. The output keeps one column per class, so a
    vote share reads like a probability (and a 2-of-3 vote is 0.667), ties included.
    """

    def __init__(self, multilabel: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.multilabel = bool(multilabel)

    def call(self, inputs):
        k = inputs[0].shape[-1]
        if self.multilabel:
            votes = [ops.cast(ops.greater_equal(x, 0.5), "float32") for x in inputs]
        else:
            votes = [ops.one_hot(ops.argmax(x, axis=-1), k, dtype="float32") for x in inputs]
        return sum(votes) / float(len(inputs))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        return {**super().get_config(), "multilabel": self.multilabel}


def ensemble_model(
    members: Sequence[keras.Model],
    method: str,
    *,
    weights: Sequence[float] | None = None,
    multilabel: bool = False,
    name: str = "medtransfer_ensemble",
) -> keras.Model:
    """One model taking the members' input (images, or images with tabular features) and
    returning the combined probabilities as ``probabilities``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two members")
    first = members[0]
    inputs = {
        key: keras.Input(tensor.shape[1:], dtype=tensor.dtype, name=key)
        for key, tensor in _named_inputs(first).items()
    }
    x = inputs if isinstance(first.input, dict) else inputs["image"]
    outputs = []
    for index, member in enumerate(members):
        member.name = f"member_{index}"
        outputs.append(member(x, training=False))
    if method == "vote":
        combined = MajorityVote(multilabel, name="probabilities")(outputs)
    else:
        combined = WeightedAverage(
            weights if method == "weighted" else [1.0] * len(members), name="probabilities"
        )(outputs)
    return keras.Model(x, combined, name=name)


def _named_inputs(model: keras.Model) -> dict:
    return model.input if isinstance(model.input, dict) else {"image": model.input}
