"""DANN's adversary: the ``GradientReversal`` layer and the domain classifier built around it.

The layer is a registered Keras class: a saved ``DomainAdaptationModel`` (or any model holding
the layer) refers to it by its registered name, ``medtransfer>GradientReversal``, and files
saved by earlier versions keep loading only while that name stays the same.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="medtransfer", name="GradientReversal")
class GradientReversal(keras.layers.Layer):
    """Identity forward; multiplies the gradient by ``-strength`` backward.

    ``strength`` is a non-trainable variable, so ``GradientReversalSchedule`` (or anything else)
    can change it between steps without retracing the train function. ``get_config`` stores the
    initial value; the current value is a weight and travels with the saved weights.
    """

    def __init__(self, strength: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_strength = float(strength)
        self.strength = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_strength),
            trainable=False,
            autocast=False,
            name="strength",
        )

    def call(self, inputs):
        strength = self.strength

        @tf.custom_gradient
        def reverse(x):
            def grad(upstream):
                # Read when the gradient is computed: the current value, no retracing.
                return -ops.cast(strength, upstream.dtype) * upstream

            return tf.identity(x), grad

        return reverse(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.initial_strength}


def domain_classifier(
    features_dim: int,
    hidden: int = 256,
    dropout: float = 0.5,
    strength: float = 1.0,
    name: str = "domain_classifier",
) -> keras.Sequential:
    """DANN's adversary: GradientReversal -> Dense(relu) -> Dropout -> Dense(1) domain logit.

    The logit is float32 under mixed precision. Source is domain 0, target domain 1.
    """
    return keras.Sequential(
        [
            keras.Input((features_dim,), name="features"),
            GradientReversal(strength, name="gradient_reversal"),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dropout(dropout, name="dropout"),
            keras.layers.Dense(1, dtype=_logit_dtype(), name="domain_logit"),
        ],
        name=name,
    )


def _logit_dtype() -> str | None:
    """float32 logits under a mixed-precision policy; otherwise the policy's own dtype."""
    return "float32" if keras.config.dtype_policy().name.startswith("mixed") else None
