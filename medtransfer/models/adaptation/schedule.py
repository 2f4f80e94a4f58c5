"""DANN's gradient-reversal schedule: the adversary's pull on the features grows over training.

At the start the features are still random and a full-strength reversed gradient would only
add noise; the schedule raises the strength from 0 as training progresses (Ganin et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from medtransfer.models.adaptation.nested import all_layers
from medtransfer.models.adaptation.reversal import GradientReversal


def dann_strength(progress: float, max_strength: float = 1.0, gamma: float = 10.0) -> float:
    """The DANN schedule ``max_strength * (2 / (1 + exp(-gamma * p)) - 1)``, ``p`` in [0, 1].

    0 at the start (the domain classifier's gradient does not disturb features that are still
    random), rising smoothly to ``max_strength * 0.99991`` at ``p = 1`` for ``gamma = 10``.
    """
    p = min(max(float(progress), 0.0), 1.0)
    return max_strength * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class GradientReversalSchedule(keras.callbacks.Callback):
    """Set every ``GradientReversal`` layer's strength to ``dann_strength(p)`` before each batch.

    ``p = (epoch * steps_per_epoch + batch) / (epochs * steps_per_epoch)`` is the fraction of
    training done before the batch, so a run resumed with ``initial_epoch`` continues the same
    curve. ``epochs`` and ``steps_per_epoch`` default to ``fit``'s; pass them when the dataset's
    length is unknown to Keras (``fit`` without ``steps_per_epoch`` on a dataset of unknown
    cardinality). ``layers`` defaults to every ``GradientReversal`` inside the model.
    """

    def __init__(
        self,
        max_strength: float = 1.0,
        gamma: float = 10.0,
        epochs: int | None = None,
        steps_per_epoch: int | None = None,
        layers: Sequence[GradientReversal] | None = None,
    ):
        super().__init__()
        self.max_strength = float(max_strength)
        self.gamma = float(gamma)
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self._layers = list(layers) if layers is not None else None
        self._epoch = 0
        self._total_steps = 0
        self._steps_per_epoch = 0

    def on_train_begin(self, logs=None):
        epochs = self.epochs or self.params.get("epochs")
        steps = self.steps_per_epoch or self.params.get("steps")
        if not epochs or not steps:
            raise ValueError(
                "GradientReversalSchedule needs the number of epochs and steps per epoch; "
                "Keras does not know them for this dataset, so pass epochs= and "
                "steps_per_epoch= to the callback"
            )
        self._steps_per_epoch = int(steps)
        self._total_steps = int(epochs) * int(steps)
        if self._layers is None:
            self._layers = [
                layer for layer in all_layers(self.model) if isinstance(layer, GradientReversal)
            ]
        if not self._layers:
            raise ValueError("GradientReversalSchedule: the model has no GradientReversal layer")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        step = self._epoch * self._steps_per_epoch + batch
        value = dann_strength(step / self._total_steps, self.max_strength, self.gamma)
        for layer in self._layers:
            layer.strength.assign(value)
