"""Finding layers wherever they sit: the adaptation tools act on layers nested in sub-models.

A ``GradientReversal`` lives inside the domain classifier, BatchNormalization layers inside a
backbone inside the classifier; ``model.layers`` lists neither.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras


def all_layers(model: keras.layers.Layer) -> Iterable[keras.layers.Layer]:
    """Every layer inside ``model``, recursively, nested models and custom layers included."""
    return model._flatten_layers(include_self=False, recursive=True)
