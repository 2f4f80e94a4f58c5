"""Self-supervised pretraining: SimSiam (Chen & He 2021), trained inside ``model.fit``.

Air-gapped hospitals often cannot fetch ImageNet weights, and hold far more unlabelled images
than labelled ones. SimSiam learns a representation from unlabelled images alone: two
augmented views of each image go through the encoder (backbone + projector), a small predictor
maps one view's projection to the other's, and the loss is their negative cosine similarity,
with the target side's gradient stopped. It needs no negative pairs (so it works with the
small batches a CPU affords, unlike SimCLR) and no momentum encoder; the stop-gradient and the
predictor are what keep it from collapsing to a constant.

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


@keras.saving.register_keras_serializable(package="medtransfer", name="SimSiam")
class SimSiam(keras.Model):
    """``fit`` on a dataset of ``(first_views, second_views)`` batches (no labels).

    Both views go through ``encoder`` and ``projector`` as one concatenated batch (one pass,
    BatchNormalization sees both); the loss is ``(D(p1, z2) + D(p2, z1)) / 2`` with
    ``D = negative_cosine``. Logs ``loss`` (-1 is perfect agreement) and ``z_std``, the
    per-dimension standard deviation of the normalised projections: about ``1/sqrt(dim)``
    while the representation is healthy, 0 when it has collapsed to a constant.
    """

    def __init__(
        self,
        encoder: keras.Model,
        projector: keras.Model,
        predictor: keras.Model,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.z_std_tracker = keras.metrics.Mean(name="z_std")

    def call(self, inputs, training=None):
        z = self.projector(self.encoder(inputs, training=training), training=training)
        return self.predictor(z, training=training)

    def _loss(self, first: tf.Tensor, second: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        n = ops.shape(first)[0]
        z = self.projector(
            self.encoder(ops.concatenate([first, second], axis=0), training=True), training=True
        )
        p = self.predictor(z, training=True)
        z1, z2, p1, p2 = z[:n], z[n:], p[:n], p[n:]
        loss = 0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))
        z_std = ops.mean(ops.std(ops.normalize(ops.cast(z1, "float32"), axis=-1), axis=0))
        return loss, z_std

    def train_step(self, data):
        first, second = data[0], data[1]
        with tf.GradientTape() as tape:
            loss, z_std = self._loss(first, second)
            loss = loss + ops.cast(sum(self.losses), loss.dtype) if self.losses else loss
            scaled = self.optimizer.scale_loss(loss)
        trainable = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, trainable), trainable)
        self._loss_tracker.update_state(loss)
        self.z_std_tracker.update_state(z_std)
        return {"loss": self._loss_tracker.result(), "z_std": self.z_std_tracker.result()}

    def test_step(self, data):
        loss, z_std = self._loss(data[0], data[1])
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
            "predictor": serialize(self.predictor),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("encoder", "projector", "predictor"):
            config[key] = keras.saving.deserialize_keras_object(
                config[key], custom_objects=custom_objects
            )
        return cls(**config)
