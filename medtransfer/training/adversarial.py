"""Adversarial training inside ``model.fit``: the spec's ``training.adversarial`` section.

Like domain adaptation (``medtransfer.training.domain``), the run builds the classifier
``build_model`` makes and ``fit`` trains a wrapper around it, ``AdversarialTrainingModel``,
whose ``train_step``

1. attacks the batch (``medtransfer.models.attacks``: FGSM or L∞ PGD against the true labels,
   with the compiled loss) through the classifier in inference mode: the weights frozen,
   BatchNormalization on its moving statistics, no Dropout, so the search changes nothing;
2. runs the clean and the adversarial images through the classifier as one batch in training
   mode, so BatchNormalization layers that train update their statistics once per step, from
   both (layers a fine-tuning phase froze stay in inference mode: Keras runs a
   BatchNormalization whose ``trainable`` is False in inference mode whatever ``training``
   says);
3. minimises ``(1 - weight) * clean loss + weight * adversarial loss``.

Everything else is the plain run's: phases compile the wrapper (``find_backbone`` finds the
backbone inside it), the best epoch is chosen on clean validation AUROC and saved as the plain
classifier (``domain.BestClassifierCheckpoint``), and ``checkpoint.npz`` holds the wrapper's
variables, PGD's random-start seed state included, so a resumed run draws the same starts.
``model.keras`` and exports never contain the wrapper.
"""

from __future__ import annotations

from dataclasses import asdict

import keras
import tensorflow as tf
from keras import ops

from medtransfer.models.attacks import Attack, perturb
from medtransfer.spec import AdversarialSpec, Spec

DEFAULT_PGD_STEPS = 3  # the spec leaves steps null unless given
_LOG_NAMES = ("clean_loss", "adversarial_loss")


def spec_attack(adversarial: AdversarialSpec) -> Attack:
    """The attack a spec's ``training.adversarial`` section describes, defaults resolved."""
    return Attack(
        method=adversarial.method,
        epsilon=adversarial.epsilon,
        steps=adversarial.steps or DEFAULT_PGD_STEPS,
        step_size=adversarial.step_size,
        random_start=True if adversarial.random_start is None else adversarial.random_start,
    )


@keras.saving.register_keras_serializable(package="medtransfer", name="AdversarialTrainingModel")
class AdversarialTrainingModel(keras.Model):
    """``classifier`` trained on a mix of clean and adversarial batches (see the module).

    ``fit`` takes the classifier's usual ``(images, targets[, sample_weight])`` batches, so
    ``class_weight`` works as for a plain run. Validation, ``evaluate`` and ``predict`` are the
    classifier's. Logs: ``loss`` (the mixed loss), ``clean_loss``, ``adversarial_loss``, and
    the compiled metrics on the clean images.
    """

    def __init__(
        self,
        classifier: keras.Model,
        attack: Attack | dict,
        weight: float = 0.5,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 < weight <= 1:
            raise ValueError(f"weight must be in (0, 1], got {weight}")
        self.classifier = classifier
        self.attack = attack if isinstance(attack, Attack) else Attack(**attack)
        self.weight = float(weight)
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.clean_loss_tracker = keras.metrics.Mean(name="clean_loss")
        self.adversarial_loss_tracker = keras.metrics.Mean(name="adversarial_loss")
        if classifier.built:
            self.built = True

    def call(self, inputs, training=None):
        return self.classifier(inputs, training=training)

    def adversarial_images(self, x, y) -> tf.Tensor:
        """The batch's adversarial images: the attack with the compiled loss, weights frozen."""
        seed = ops.cast(self.seed_generator.next(), "int32")
        return perturb(self.classifier, self.loss, x, y, self.attack, seed=seed)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        x = ops.convert_to_tensor(x, "float32")
        x_adv = self.adversarial_images(x, y)
        n = ops.shape(x)[0]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        with tf.GradientTape() as tape:
            both = self.classifier(ops.concatenate([x, x_adv], axis=0), training=True)
            y_pred, y_adv = both[:n], both[n:]
            # Keras scales the compiled loss by 1 / replicas (and adds regularisation to each,
            # which the two weights sum back to once).
            clean = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            adversarial = self._compute_loss(
                x=x_adv, y=y, y_pred=y_adv, sample_weight=sample_weight, training=True
            )
            loss = (1.0 - self.weight) * clean + self.weight * adversarial
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        trainable = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, trainable), trainable)
        self._loss_tracker.update_state(loss * replicas, sample_weight=n)
        self.clean_loss_tracker.update_state(clean * replicas, sample_weight=n)
        self.adversarial_loss_tracker.update_state(adversarial * replicas, sample_weight=n)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        logs = super().test_step(data)
        return {k: v for k, v in logs.items() if k not in _LOG_NAMES}

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "classifier": keras.saving.serialize_keras_object(self.classifier),
            "attack": asdict(self.attack),
            "weight": self.weight,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        config["classifier"] = keras.saving.deserialize_keras_object(
            config["classifier"], custom_objects=custom_objects
        )
        return cls(**config)


def training_model(model: keras.Model, spec: Spec) -> keras.Model:
    """What ``fit`` trains: ``model`` itself, or with ``training.adversarial`` an
    ``AdversarialTrainingModel`` around it (random starts seeded from the training seed)."""
    adversarial = spec.training.adversarial
    if adversarial is None:
        return model
    return AdversarialTrainingModel(
        model,
        spec_attack(adversarial),
        weight=adversarial.weight,
        seed=spec.training.seed,
        name=f"{model.name}_adversarial",
    )
