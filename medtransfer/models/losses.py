"""Multilabel loss and metrics that skip unknown labels.

Multilabel medical datasets rarely label every finding on every image: a report that does not
mention effusion says nothing about it (CheXpert's blank), a radiologist may be unsure (its -1).
Counting those as negatives teaches the model that unmentioned findings are absent. Unknown
labels are NaN in the target matrix; they contribute nothing to the loss, the AUROC or the
accuracy, while the image's known labels still train.
"""

from __future__ import annotations

import keras
from keras import ops

_PACKAGE = "medtransfer"


def _known(y_true):
    """(targets with unknowns set to 0, 1.0 where the label is known)."""
    known = ops.logical_not(ops.isnan(y_true))
    return ops.where(known, y_true, 0.0), ops.cast(known, y_true.dtype)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedMultilabelLoss(keras.losses.Loss):
    """Per-label binary cross-entropy (or focal loss), averaged over an image's known labels.

    ``gamma`` 0 is cross-entropy; with all labels known it equals Keras's
    ``BinaryCrossentropy`` (and ``BinaryFocalCrossentropy`` for ``gamma`` > 0). An image with no
    known label contributes 0.
    """

    def __init__(
        self,
        gamma: float = 0.0,
        label_smoothing: float = 0.0,
        name: str = "masked_multilabel_loss",
        **kwargs,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.gamma, self.label_smoothing = float(gamma), float(label_smoothing)

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true, known = _known(ops.cast(y_true, y_pred.dtype))
        smoothed = y_true * (1.0 - self.label_smoothing) + 0.5 * self.label_smoothing
        per_label = ops.binary_crossentropy(smoothed, y_pred)
        if self.gamma:
            p_t = smoothed * y_pred + (1.0 - smoothed) * (1.0 - y_pred)  # as Keras's focal
            per_label = per_label * ops.power(1.0 - p_t, self.gamma)
        return ops.sum(per_label * known, axis=-1) / ops.maximum(ops.sum(known, axis=-1), 1.0)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "gamma": self.gamma,
            "label_smoothing": self.label_smoothing,
        }


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedAUC(keras.metrics.AUC):
    """Keras's AUC with unknown (NaN) labels given zero weight, label by label."""

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, known = _known(ops.cast(y_true, "float32"))
        if sample_weight is not None:
            known = known * ops.expand_dims(ops.cast(sample_weight, "float32"), -1)
        return super().update_state(y_true, y_pred, sample_weight=known)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MaskedBinaryAccuracy(keras.metrics.Mean):
    """Share of known labels on the right side of ``threshold``."""

    def __init__(self, threshold: float = 0.5, name: str = "accuracy", **kwargs) -> None:
        super().__init__(name=name, **kwargs)
        self.threshold = float(threshold)

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_true, known = _known(ops.cast(y_true, "float32"))
        hits = ops.cast(ops.equal(y_true > 0.5, y_pred > self.threshold), "float32")
        if sample_weight is not None:
            known = known * ops.expand_dims(ops.cast(sample_weight, "float32"), -1)
        return super().update_state(hits, sample_weight=known)

    def get_config(self) -> dict:
        return {**super().get_config(), "threshold": self.threshold}
