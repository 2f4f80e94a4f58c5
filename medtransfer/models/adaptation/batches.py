"""The batches ``DomainAdaptationModel.fit`` takes: ``((source_images, source_targets[,
weights]), target_images)``, how they are recognised and unpacked, and class weights folded in.

Keras's own ``class_weight`` and ``(x, y, sample_weight)`` unpacking cannot see inside this
nested structure, so both are handled here.
"""

from __future__ import annotations

from collections.abc import Mapping

import keras
import tensorflow as tf


def is_adaptation_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (tuple, list))
        and len(data[0]) in (2, 3)
    )


def unpack_adaptation_batch(data):
    """``(x, y, sample_weight, target_images)``; anything after a target element's images is
    ignored."""
    if not is_adaptation_batch(data):
        raise ValueError(
            "DomainAdaptationModel.fit expects batches ((source_images, source_targets), "
            "target_images), e.g. tf.data.Dataset.zip((source_ds, target_ds)); source may "
            "carry sample weights as a third element"
        )
    source, target = data
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(tuple(source))
    if isinstance(target, (tuple, list)):
        target = target[0]
    return x, y, sample_weight, target


def with_class_weights(source: tf.data.Dataset, class_weight: Mapping[int, float]):
    """Map a batched ``(images, targets)`` source dataset to ``(images, targets, weights)``.

    Keras-style ``class_weight`` (class index -> weight, all classes 0..k-1): one-hot targets
    are weighted by their argmax, integer targets by their value, as ``fit(class_weight=...)``
    does for plain datasets.
    """
    k = len(class_weight)
    if sorted(class_weight) != list(range(k)):
        raise ValueError(f"class_weight needs keys 0..{k - 1}, got {sorted(class_weight)}")
    table = tf.constant([float(class_weight[i]) for i in range(k)], tf.float32)

    def add_weights(images, targets):
        if targets.shape.rank == 2 and targets.shape[-1] != 1:
            index = tf.argmax(targets, axis=-1)
        else:
            index = tf.cast(tf.reshape(targets, (-1,)), tf.int64)
        return images, targets, tf.gather(table, index)

    return source.map(add_weights)
