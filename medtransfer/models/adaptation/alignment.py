"""The alignment term of ``DomainAdaptationModel``'s loss, by the registry's loss name.

A method's entry in ``medtransfer.models.adaptation_methods`` names its loss
(``alignment_loss``); this table holds the implementation, which stays out of the registry so
that the registry imports no TensorFlow. Each function takes the training model (for what the
loss needs of it: MMD's fixed bandwidths, DANN's domain classifier and accuracy tracker) and the
source and target feature batches, and returns a scalar loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
from keras import ops

from medtransfer.models.adaptation.losses import at_least_float32, coral_loss, mmd_loss

AlignmentLoss = Callable[[keras.Model, Any, Any], Any]


def _coral(model: keras.Model, source_features, target_features):
    return coral_loss(source_features, target_features)


def _mmd(model: keras.Model, source_features, target_features):
    return mmd_loss(source_features, target_features, bandwidths=model.mmd_bandwidths)


def _domain(model: keras.Model, source_features, target_features):
    """DANN: the domain classifier's cross-entropy on both batches (source 0, target 1); its
    GradientReversal layer turns minimising it into confusing it, for the features."""
    both = ops.concatenate([source_features, target_features], axis=0)
    logits = at_least_float32(model.domain_classifier(both, training=True))
    domains = ops.concatenate(
        [
            ops.zeros((ops.shape(source_features)[0], 1), logits.dtype),
            ops.ones((ops.shape(target_features)[0], 1), logits.dtype),
        ],
        axis=0,
    )
    model.domain_accuracy_tracker.update_state(domains, logits)
    return ops.mean(keras.losses.binary_crossentropy(domains, logits, from_logits=True))


ALIGNMENT_LOSSES: dict[str, AlignmentLoss] = {"coral": _coral, "mmd": _mmd, "domain": _domain}
