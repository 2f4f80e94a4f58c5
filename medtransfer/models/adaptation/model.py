"""``DomainAdaptationModel``: the task on labelled source images, features aligned with
unlabelled target images, all inside ``model.fit``.

A registered Keras class: a saved model refers to it by its registered name,
``medtransfer>DomainAdaptationModel``, and files saved by earlier versions keep loading only
while that name stays the same. Which methods it trains, and what each needs, comes from the
method registry (``medtransfer.models.adaptation_methods``).
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import tensorflow as tf
from keras import ops

from medtransfer.models.adaptation.alignment import ALIGNMENT_LOSSES
from medtransfer.models.adaptation.batches import is_adaptation_batch, unpack_adaptation_batch
from medtransfer.models.adaptation.nested import all_layers
from medtransfer.models.adaptation.reversal import GradientReversal
from medtransfer.models.adaptation_methods import (
    ADAPTATION_METHODS,
    ALIGNMENT_METHODS,
    AdaptationMethod,
)


@keras.saving.register_keras_serializable(package="medtransfer", name="DomainAdaptationModel")
class DomainAdaptationModel(keras.Model):
    """``head(features(images))`` trained on labelled source and unlabelled target images.

    ``features``: a model from images to pooled (batch, d) features; ``head``: a model or layer
    from features to predictions. ``method``: ``"coral"``, ``"mmd"`` or ``"dann"`` (which needs
    ``domain_classifier``, e.g. ``domain_classifier(d)``, containing a ``GradientReversal``).
    The loss is ``task + weight * alignment``, the task loss being the compiled one (plus any
    regularisation penalties) on source images only.

    ``fit`` takes a dataset of ``((source_images, source_targets), target_images)``, e.g.
    ``tf.data.Dataset.zip((source_ds, target_ds))``; a source element may also be
    ``(images, targets, sample_weight)``, and a target element ``(images, ...)`` (anything after
    the images is ignored). Source and target batches go through ``features`` as one
    concatenated batch, so they need the same image size and BatchNormalization sees both
    domains. Keras's ``class_weight`` cannot see inside this structure: fold class weights
    into the source dataset with ``with_class_weights``.

    Validation, ``evaluate``, ``predict``, ``export`` and ``inference_model`` are those of the
    plain classifier on ``(images, targets)``; the domain classifier never takes part.
    Logs: ``loss`` (the total), ``task_loss``, and ``alignment_loss`` (CORAL/MMD) or
    ``domain_loss`` and ``domain_accuracy`` (DANN), besides the compiled metrics on source.
    """

    def __init__(
        self,
        features: keras.Model,
        head: keras.layers.Layer,
        method: str = "coral",
        weight: float = 1.0,
        domain_classifier: keras.layers.Layer | None = None,
        mmd_bandwidths: Sequence[float] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if method not in ALIGNMENT_METHODS:
            raise ValueError(f"method must be one of {ALIGNMENT_METHODS}, got {method!r}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        registered = ADAPTATION_METHODS[method]
        _check_domain_classifier(registered, domain_classifier)
        self.features = features
        self.head = head
        self.domain_classifier = domain_classifier
        self.method = method
        self.weight = float(weight)
        self.mmd_bandwidths = None if mmd_bandwidths is None else [float(b) for b in mmd_bandwidths]
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        # An adversarial alignment is the domain classifier's loss, and it has an accuracy.
        adversarial = registered.needs_domain_classifier
        alignment_name = "domain_loss" if adversarial else "alignment_loss"
        self.alignment_loss_tracker = keras.metrics.Mean(name=alignment_name)
        self.domain_accuracy_tracker = (
            keras.metrics.BinaryAccuracy(name="domain_accuracy", threshold=0.0)
            if adversarial
            else None
        )
        self._adaptation_metric_names = {"task_loss", alignment_name, "domain_accuracy"}
        if all(part.built for part in (features, head, domain_classifier) if part is not None):
            self.built = True

    @property
    def adaptation_method(self) -> AdaptationMethod:
        """The registry entry of ``method``: what the alignment needs and which loss it uses."""
        return ADAPTATION_METHODS[self.method]

    def call(self, inputs, training=None):
        return self.head(self.features(inputs, training=training), training=training)

    # -- training ------------------------------------------------------------------------------

    def train_step(self, data):
        x, y, sample_weight, target = unpack_adaptation_batch(data)
        x = ops.convert_to_tensor(x)
        target = ops.cast(target, x.dtype)
        source_shape, target_shape = tuple(x.shape[1:]), tuple(target.shape[1:])
        if None not in source_shape + target_shape and source_shape != target_shape:
            raise ValueError(
                f"source images {source_shape} and target images {target_shape} differ in "
                "size; both go through the feature extractor as one batch"
            )
        n_source = ops.shape(x)[0]
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        alignment_loss = ALIGNMENT_LOSSES[self.adaptation_method.alignment_loss]
        with tf.GradientTape() as tape:
            both = ops.concatenate([x, target], axis=0)
            features = self.features(both, training=True)
            source_features, target_features = features[:n_source], features[n_source:]
            y_pred = self.head(source_features, training=True)
            # Keras scales the compiled loss by 1 / replicas; the alignment term follows suit.
            task_loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            alignment = alignment_loss(self, source_features, target_features)
            alignment = ops.cast(alignment, task_loss.dtype)
            loss = task_loss + (self.weight / replicas) * alignment
            scaled = self.optimizer.scale_loss(loss) if self.optimizer is not None else loss
        trainable = self.trainable_variables
        gradients = tape.gradient(scaled, trainable)
        self.optimizer.apply(gradients, trainable)

        self._loss_tracker.update_state(loss * replicas, sample_weight=n_source)
        self.task_loss_tracker.update_state(task_loss * replicas, sample_weight=n_source)
        self.alignment_loss_tracker.update_state(alignment)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def test_step(self, data):
        logs = super().test_step(data)
        return {k: v for k, v in logs.items() if k not in self._adaptation_metric_names}

    def fit(self, *args, class_weight=None, **kwargs):
        if class_weight is not None:
            raise ValueError(
                "class_weight cannot reach the source targets inside a "
                "((source_images, source_targets), target_images) dataset; fold the weights "
                "into the source dataset with medtransfer.models.adaptation.with_class_weights"
            )
        return super().fit(*args, **kwargs)

    def _symbolic_build(self, iterator=None, data_batch=None):
        # Under a tf.distribute strategy Keras builds the compiled loss and metrics from one
        # batch it unpacks as (x, y, sample_weight); hand it the source part of ours.
        if is_adaptation_batch(data_batch):
            data_batch = data_batch[0]
        return super()._symbolic_build(iterator=iterator, data_batch=data_batch)

    # -- inference and serialisation -------------------------------------------------------------

    def inference_model(self) -> keras.Model:
        """A functional ``images -> head(features(images))`` sharing this model's layers."""
        try:
            spec = self.features.inputs[0]
        except (AttributeError, TypeError, IndexError):
            raise ValueError(
                "inference_model needs a functional or Sequential feature extractor with an Input"
            ) from None
        inputs = keras.Input(batch_shape=spec.shape, dtype=spec.dtype, name="image")
        return keras.Model(inputs, self.head(self.features(inputs)), name=self.name)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kw):
        """Export ``inference_model()``: Keras would otherwise track every variable of this
        model, the domain classifier's included, into the artifact."""
        return self.inference_model().export(
            filepath, format=format, verbose=verbose, input_signature=input_signature, **kw
        )

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        return {
            "name": self.name,
            "trainable": self.trainable,
            "features": serialize(self.features),
            "head": serialize(self.head),
            "method": self.method,
            "weight": self.weight,
            "domain_classifier": (
                None if self.domain_classifier is None else serialize(self.domain_classifier)
            ),
            "mmd_bandwidths": None if self.mmd_bandwidths is None else list(self.mmd_bandwidths),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        for key in ("features", "head", "domain_classifier"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(
                    config[key], custom_objects=custom_objects
                )
        return cls(**config)


def _check_domain_classifier(
    method: AdaptationMethod, classifier: keras.layers.Layer | None
) -> None:
    """An adversarial method without a reversing domain classifier would train the features to
    *help* the domain classifier; any other method would silently ignore one."""
    if not method.needs_domain_classifier:
        if classifier is not None:
            raise ValueError(f"method {method.name!r} does not use a domain_classifier")
        return
    if classifier is None:
        raise ValueError(f"method {method.name!r} needs a domain_classifier")
    if not any(isinstance(layer, GradientReversal) for layer in all_layers(classifier)):
        raise ValueError(
            "the domain classifier has no GradientReversal layer: without it the "
            "features would be trained to help the domain classifier, not to fool it"
        )
