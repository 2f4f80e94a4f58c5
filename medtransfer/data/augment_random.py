"""Stateless randomness for augmentation: every draw is a pure function of (run seed, epoch, batch).

Keras' random layers keep their state in a ``SeedGenerator`` variable; in a parallel ``tf.data``
map its updates race, and a run resumed at epoch k could not repeat what an uninterrupted run
drew. Here each batch gets a seed from (run seed, epoch, batch) and every draw inside the layers
folds a counter into it (:class:`StatelessDraws`). The same seed gives the same batches in any
process, epochs differ, and ``--resume`` stays bit-exact.
"""

from __future__ import annotations

import keras
import tensorflow as tf

_AUGMENT_STREAM = 0x61756731  # keeps augmentation draws apart from the data order's


class StatelessDraws(keras.random.SeedGenerator):
    """A ``SeedGenerator`` whose every draw is a pure function of one seed tensor.

    Keras layers take a ``SeedGenerator`` as ``seed`` and call ``next()`` once per random op;
    numbering those calls while the graph is traced gives each op its own stream without any
    variable, so parallel map calls cannot interfere.
    """

    def __init__(self, seed: tf.Tensor) -> None:  # no super().__init__: it creates a variable
        self._seed = tf.cast(seed, tf.int64)
        self._draws = 0

    def next(self, ordered: bool = True) -> tf.Tensor:
        self._draws += 1
        return tf.random.experimental.stateless_fold_in(self._seed, self._draws)


def batch_seed(seed: int, epoch: tf.Tensor, batch: tf.Tensor) -> tf.Tensor:
    """The stateless seed of one training batch: a function of (run seed, epoch, batch)."""
    base = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
    fold = tf.random.experimental.stateless_fold_in
    return fold(fold(base, tf.cast(epoch, tf.int64)), tf.cast(batch, tf.int64))
