"""Self-supervised pretraining: SimSiam (Chen & He 2021) or SimCLR (Chen et al. 2020), trained
inside ``model.fit``.

Air-gapped hospitals often cannot fetch ImageNet weights, and hold far more unlabelled images
than labelled ones. SimSiam learns a representation from unlabelled images alone: two
augmented views of each image go through the encoder (backbone + projector), a small predictor
maps one view's projection to the other's, and the loss is their negative cosine similarity,
with the target side's gradient stopped. It needs no negative pairs (so it works with the
small batches a CPU affords, unlike SimCLR) and no momentum encoder; the stop-gradient and the
predictor are what keep it from collapsing to a constant. That guard is implicit: on small
in-domain sets the projections can still narrow to a few directions (``z_std`` falling).

SimCLR guards explicitly: each view must pick its partner out of the batch's ``2n - 2`` other
views (the NT-Xent loss), so the images are pushed apart as well as the views together. It
needs a batch with enough negatives (64 gives 126), which a CPU affords at MedMNIST's sizes.

The encoder is a functional model whose backbone layer is named ``backbone``, as in the
classifier ``build_model`` makes: a pretraining run saves it as its ``model.keras``, and
``model.weights: run:PRETRAIN_RUN`` starts a classifier from that backbone. Projector and
predictor are training-time devices and are never saved with it.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

PROJECTION_DIM = 512
PREDICTOR_DIM = 128


def projector(dim: int = PROJECTION_DIM, name: str = "projector") -> keras.Sequential:
    """SimSiam's projection MLP: two hidden layers with BatchNormalization, and a
    BatchNormalized linear output (the paper's 3-layer MLP, narrower for CPU budgets)."""
    return keras.Sequential(
        [
            keras.layers.Dense(dim, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(dim, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(dim, use_bias=False),
            keras.layers.BatchNormalization(),
        ],
        name=name,
    )


def predictor(dim: int = PROJECTION_DIM, hidden: int = PREDICTOR_DIM) -> keras.Sequential:
    """SimSiam's bottleneck predictor: projection -> hidden (BatchNorm, ReLU) -> projection."""
    return keras.Sequential(
        [
            keras.layers.Dense(hidden, use_bias=False),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(dim),
        ],
        name="predictor",
    )


def negative_cosine(p: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """``-mean(cos(p, stop_gradient(z)))``: the target ``z`` is a constant for this term."""
    p = ops.normalize(ops.cast(p, "float32"), axis=-1)
    z = ops.normalize(ops.stop_gradient(ops.cast(z, "float32")), axis=-1)
    return -ops.mean(ops.sum(p * z, axis=-1))


def nt_xent(z1: tf.Tensor, z2: tf.Tensor, temperature: float) -> tf.Tensor:
    """SimCLR's loss: cross-entropy of each view picking its partner (row ``i`` of ``z1`` is
    the partner of row ``i`` of ``z2``) among the other ``2n - 1`` views, by cosine similarity
    over ``temperature``. Chance (every view alike) is ``log(2n - 1)``."""
    z = ops.normalize(ops.cast(ops.concatenate([z1, z2], axis=0), "float32"), axis=-1)
    n = ops.shape(z1)[0]
    logits = ops.matmul(z, ops.transpose(z)) / temperature
    logits = logits - 1e9 * ops.eye(2 * n, dtype=logits.dtype)  # a view is not its own partner
    partners = ops.concatenate([ops.arange(n) + n, ops.arange(n)], axis=0)
    return ops.mean(
        keras.losses.sparse_categorical_crossentropy(partners, logits, from_logits=True)
    )


class _TwoViewModel(keras.Model):
    """``fit`` on a dataset of ``(first_views, second_views)`` batches (no labels).

    Both views go through ``encoder`` and ``projector`` as one concatenated batch (one pass,
    BatchNormalization sees both); subclasses turn the two projections into a loss. Logs
    ``loss`` and ``z_std``, the per-dimension standard deviation of the normalised
    projections: about ``1/sqrt(dim)`` while the representation is healthy, 0 when it has
    collapsed to a constant.
    """

    def __init__(self, encoder: keras.Model, projector: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projector = projector
        self.z_std_tracker = keras.metrics.Mean(name="z_std")

    def call(self, inputs, training=None):
        return self.projector(self.encoder(inputs, training=training), training=training)

    def _pair_loss(self, z: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        """The loss of ``z``, the first views' projections (rows ``:n``) then the second's."""
        raise NotImplementedError

    def _loss(self, first: tf.Tensor, second: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        n = ops.shape(first)[0]
        z = self.projector(
            self.encoder(ops.concatenate([first, second], axis=0), training=True), training=True
        )
        z_std = ops.mean(ops.std(ops.normalize(ops.cast(z[:n], "float32"), axis=-1), axis=0))
        return self._pair_loss(z, n), z_std

    def train_step(self, data):
        first, second = data[0], data[1]
        with tf.GradientTape() as tape:
            loss, z_std = self._loss(first, second)
            loss = loss + ops.cast(sum(self.losses), loss.dtype) if self.losses else loss
            scaled = self.optimizer.scale_loss(loss)
        trainable = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, trainable), trainable)
        return self._track(loss, z_std)

    def test_step(self, data):
        return self._track(*self._loss(data[0], data[1]))

    def _track(self, loss: tf.Tensor, z_std: tf.Tensor) -> dict:
        self._loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(z_std)
        return {"loss": self._loss_tracker.result(), "z_std": self.z_std_tracker.result()}

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": serialize(self.encoder),
            "projector": serialize(self.projector),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "projector", "predictor"):
            if key in config:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


@keras.saving.register_keras_serializable(package="medtransfer", name="SimSiam")
class SimSiam(_TwoViewModel):
    """SimSiam: the loss is ``(D(p1, z2) + D(p2, z1)) / 2`` with ``D = negative_cosine`` and
    ``p = predictor(z)``; -1 is perfect agreement."""

    def __init__(
        self, encoder: keras.Model, projector: keras.Model, predictor: keras.Model, **kwargs
    ):
        super().__init__(encoder, projector, **kwargs)
        self.predictor = predictor

    def call(self, inputs, training=None):
        return self.predictor(super().call(inputs, training=training), training=training)

    def _pair_loss(self, z: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        p = self.predictor(z, training=True)  # one pass: BatchNormalization sees both views
        return 0.5 * (negative_cosine(p[:n], z[n:]) + negative_cosine(p[n:], z[:n]))

    def get_config(self):
        predictor = keras.saving.serialize_keras_object(self.predictor)
        return {**super().get_config(), "predictor": predictor}


@keras.saving.register_keras_serializable(package="medtransfer", name="SimCLR")
class SimCLR(_TwoViewModel):
    """SimCLR: ``nt_xent`` of the two views' projections at ``temperature``."""

    def __init__(
        self, encoder: keras.Model, projector: keras.Model, temperature: float = 0.2, **kwargs
    ):
        super().__init__(encoder, projector, **kwargs)
        self.temperature = temperature

    def _pair_loss(self, z: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
        return nt_xent(z[:n], z[n:], self.temperature)

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature}
