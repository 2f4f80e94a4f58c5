"""Unsupervised domain adaptation: train on one hospital's labelled images, work at another's.

A model trained on one scanner, protocol or population often loses accuracy at another site
because its features shift, not because the task changed. The tools here use *unlabelled*
images from the target site:

- ``DomainAdaptationModel`` trains the task on labelled source images while aligning the pooled
  features of source and target batches, all inside ``model.fit``: ``"coral"`` (second-order
  statistics, Sun & Saenko 2016), ``"mmd"`` (multi-kernel Gaussian MMD, Long et al. 2015) or
  ``"dann"`` (a domain classifier behind a ``GradientReversal`` layer, Ganin et al. 2016).
- ``adapt_batchnorm`` (AdaBN, Li et al. 2016) needs no training at all: it re-estimates every
  BatchNormalization layer's moving statistics on target images.

Inference and export only use the feature extractor and the task head; the domain classifier is
a training-time device and never reaches a SavedModel.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

METHODS = ("dann", "coral", "mmd")
MMD_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)
_PACKAGE = "medtransfer"


# --- gradient reversal -------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GradientReversal(keras.layers.Layer):
    """Identity forward; multiplies the gradient by ``-strength`` backward.

    ``strength`` is a non-trainable variable, so ``GradientReversalSchedule`` (or anything else)
    can change it between steps without retracing the train function. ``get_config`` stores the
    initial value; the current value is a weight and travels with the saved weights.
    """

    def __init__(self, strength: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.initial_strength = float(strength)
        self.strength = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.initial_strength),
            trainable=False,
            autocast=False,
            name="strength",
        )

    def call(self, inputs):
        strength = self.strength

        @tf.custom_gradient
        def reverse(x):
            def grad(upstream):
                # Read when the gradient is computed: the current value, no retracing.
                return -ops.cast(strength, upstream.dtype) * upstream

            return tf.identity(x), grad

        return reverse(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "strength": self.initial_strength}


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
                layer for layer in _all_layers(self.model) if isinstance(layer, GradientReversal)
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


def domain_classifier(
    features_dim: int,
    hidden: int = 256,
    dropout: float = 0.5,
    strength: float = 1.0,
    name: str = "domain_classifier",
) -> keras.Sequential:
    """DANN's adversary: GradientReversal -> Dense(relu) -> Dropout -> Dense(1) domain logit.

    The logit is float32 under mixed precision. Source is domain 0, target domain 1.
    """
    return keras.Sequential(
        [
            keras.Input((features_dim,), name="features"),
            GradientReversal(strength, name="gradient_reversal"),
            keras.layers.Dense(hidden, activation="relu", name="hidden"),
            keras.layers.Dropout(dropout, name="dropout"),
            keras.layers.Dense(1, dtype=_logit_dtype(), name="domain_logit"),
        ],
        name=name,
    )


def _logit_dtype() -> str | None:
    """float32 logits under a mixed-precision policy; otherwise the policy's own dtype."""
    return "float32" if keras.config.dtype_policy().name.startswith("mixed") else None


# --- alignment losses on pooled features ----------------------------------------------------------


def _at_least_float32(x):
    x = ops.convert_to_tensor(x)
    dtype = keras.backend.standardize_dtype(x.dtype)
    return x if dtype == "float64" else ops.cast(x, "float32")


def _covariance(x):
    """Unbiased (n - 1) feature covariance; a single-row batch has covariance 0, not NaN."""
    n = ops.cast(ops.shape(x)[0], x.dtype)
    centred = x - ops.mean(x, axis=0, keepdims=True)
    return ops.matmul(ops.transpose(centred), centred) / ops.maximum(n - 1.0, 1.0)


def coral_loss(source, target):
    """Deep CORAL: ``||C_s - C_t||_F^2 / (4 d^2)`` over (batch, d) features (Sun & Saenko 2016).

    ``C`` are the unbiased feature covariances of each batch. CORAL compares second-order
    statistics only: it is blind to a mean shift between domains (use ``mmd_loss`` for that).
    Computed in float32 (float64 for float64 features).
    """
    source = _at_least_float32(source)
    target = ops.cast(target, source.dtype)
    d = ops.cast(ops.shape(source)[-1], source.dtype)
    difference = _covariance(source) - _covariance(target)
    return ops.sum(ops.square(difference)) / (4.0 * d * d)


def _squared_distances(x):
    squared_norms = ops.sum(ops.square(x), axis=1)
    gram = ops.matmul(x, ops.transpose(x))
    distances = squared_norms[:, None] + squared_norms[None, :] - 2.0 * gram
    return ops.maximum(distances, 0.0)


def _median_off_diagonal(matrix):
    """Median of a square matrix's off-diagonal entries (each pair counted from both sides)."""
    n = ops.shape(matrix)[0]
    diagonal = ops.eye(n, dtype=matrix.dtype) > 0.5
    # The n diagonal entries sort last, so the first n^2 - n are exactly the off-diagonal ones.
    ordered = ops.sort(ops.reshape(ops.where(diagonal, np.inf, matrix), (-1,)))
    count = n * n - n
    low = ops.take(ordered, (count - 1) // 2)
    high = ops.take(ordered, count // 2)
    return (low + high) / 2.0


def mmd_loss(
    source,
    target,
    bandwidths: Sequence[float] | None = None,
    multipliers: Sequence[float] = MMD_MULTIPLIERS,
):
    """Multi-kernel Gaussian MMD^2 between two (batch, d) feature batches.

    The kernel is the mean of ``exp(-||a - b||^2 / (2 sigma^2))`` over the bandwidths ``sigma``.
    By default ``sigma = multiplier * median`` pairwise distance between the rows of both
    batches pooled (the median heuristic, under ``stop_gradient``: the features cannot shrink
    the loss by stretching the bandwidth); ``bandwidths`` fixes the sigmas instead.

    The estimator is the biased (V-statistic) one: ``mean K_ss + mean K_tt - 2 mean K_st``,
    which is never negative, is exactly 0 for identical batches and is biased upwards by
    O(1/batch). (The unbiased U-statistic drops the diagonal terms; it is noisier and can go
    negative, which makes a poor loss on small batches.) Computed in float32 (float64 for float64
    features).
    """
    source = _at_least_float32(source)
    target = ops.cast(target, source.dtype)
    pooled = ops.concatenate([source, target], axis=0)
    distances = _squared_distances(pooled)
    if bandwidths is None:
        median = ops.maximum(_median_off_diagonal(ops.stop_gradient(distances)), 1e-12)
        variances = [float(m) ** 2 * median for m in multipliers]
    else:
        variances = [float(b) ** 2 for b in bandwidths]
    if not variances:
        raise ValueError("mmd_loss needs at least one bandwidth")
    kernel = sum(ops.exp(-distances / (2.0 * v)) for v in variances) / len(variances)
    n = ops.shape(source)[0]
    return ops.mean(kernel[:n, :n]) + ops.mean(kernel[n:, n:]) - 2.0 * ops.mean(kernel[:n, n:])


# --- AdaBN --------------------------------------------------------------------------------------


def adapt_batchnorm(
    model: keras.Model,
    target_images,
    batch_size: int = 32,
    exact: bool = True,
) -> list[str]:
    """AdaBN (Li et al. 2016): set each BatchNormalization layer's moving statistics to the
    population mean and variance of its inputs over ``target_images``.

    Only ``moving_mean`` and ``moving_variance`` change (and ``moving_stddev`` of renorm layers,
    kept equal to ``sqrt(variance + epsilon)``); kernels, gamma, beta, trainable flags and
    momentum are untouched, frozen BN layers included. Statistics are accumulated exactly
    (per-batch moments merged in float64), so the result does not depend on ``batch_size``;
    the variance is the population one (``ddof=0``), as BatchNormalization uses.

    ``exact=True``: the statistics are those of the inputs each layer sees *at inference* once
    every earlier layer is adapted. That takes one pass over the target images per BN layer
    (layers are adapted in call order). ``exact=False``: one pass, in which every BN layer
    normalises with the current batch's statistics (the usual train-mode AdaBN): exact for BN
    layers with no BN upstream, an approximation further down that improves with batch size.

    ``target_images``: an array of images, or a finite, re-iterable ``tf.data.Dataset`` of
    batches (of images, or of tuples whose first element is the images). Returns the adapted
    layers' names in call order. BN layers the model does not call are left alone.
    """
    layers = [
        layer for layer in _all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return []
    if not all(layer.built for layer in layers):
        raise ValueError("adapt_batchnorm needs a built model (call it once on a batch first)")
    batches = _image_batches(target_images, batch_size)
    batch_statistics = not exact
    records: list[list] = [[] for _ in layers]
    order: list[int] = []

    def hook(index: int, layer: keras.layers.BatchNormalization, original: Callable):
        def call(inputs, training=None, mask=None):
            if mask is not None:
                raise NotImplementedError("adapt_batchnorm does not support masked inputs")
            x = _at_least_float32(inputs)
            axis = layer.axis % len(x.shape)
            axes = [i for i in range(len(x.shape)) if i != axis]
            mean, variance = ops.moments(x, axes)
            count = tf.size(x, out_type=tf.int64) // tf.cast(tf.shape(x)[axis], tf.int64)
            records[index].append((count, mean, variance))
            if index not in order:
                order.append(index)
            if not batch_statistics:
                return original(inputs, training=False, mask=mask)
            outputs = ops.batch_normalization(
                x,
                mean,
                variance,
                axis=axis,
                offset=ops.cast(layer.beta, x.dtype) if layer.center else None,
                scale=ops.cast(layer.gamma, x.dtype) if layer.scale else None,
                epsilon=layer.epsilon,
            )
            return ops.cast(outputs, layer.compute_dtype)

        return call

    @tf.function(reduce_retracing=True)
    def forward(images):
        for record in records:
            record.clear()
        model(images, training=False)
        return [list(record) for record in records]

    def one_pass() -> list[_Moments]:
        moments = [_Moments() for _ in layers]
        for images in batches():
            for accumulator, results in zip(moments, forward(images), strict=True):
                for count, mean, variance in results:
                    accumulator.add(int(count), np.asarray(mean), np.asarray(variance))
        return moments

    saved = [layer.__dict__.get("call") for layer in layers]
    for index, layer in enumerate(layers):
        layer.call = hook(index, layer, layer.call)
    try:
        moments = one_pass()
        if not order or all(moments[index].count == 0 for index in order):
            raise ValueError("adapt_batchnorm: target_images is empty")
        if batch_statistics:
            for index in order:
                _assign_statistics(layers[index], moments[index])
        else:
            for position, index in enumerate(order):
                if position:
                    moments = one_pass()
                _assign_statistics(layers[index], moments[index])
    finally:
        for layer, previous in zip(layers, saved, strict=True):
            if previous is None:
                del layer.call
            else:
                layer.call = previous
    return [layers[index].name for index in order]


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged exactly (Chan et al.)."""

    def __init__(self):
        self.count = 0
        self.mean = np.zeros(0)
        self.m2 = np.zeros(0)

    def add(self, count: int, mean: np.ndarray, variance: np.ndarray) -> None:
        if count == 0:
            return
        mean = mean.astype(np.float64)
        m2 = variance.astype(np.float64) * count
        if self.count == 0:
            self.count, self.mean, self.m2 = count, mean, m2
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / total)
        self.count = total

    @property
    def variance(self) -> np.ndarray:
        return self.m2 / self.count


def _assign_statistics(layer: keras.layers.BatchNormalization, moments: _Moments) -> None:
    layer.moving_mean.assign(moments.mean.astype(layer.moving_mean.dtype))
    layer.moving_variance.assign(moments.variance.astype(layer.moving_variance.dtype))
    if getattr(layer, "renorm", False):
        stddev = np.sqrt(moments.variance + layer.epsilon)
        layer.moving_stddev.assign(stddev.astype(layer.moving_stddev.dtype))


def _image_batches(target_images, batch_size: int) -> Callable[[], Iterator]:
    if isinstance(target_images, tf.data.Dataset):

        def from_dataset():
            for element in target_images:
                yield element[0] if isinstance(element, (tuple, list)) else element

        return from_dataset
    images = target_images if tf.is_tensor(target_images) else np.asarray(target_images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")

    def from_array():
        for start in range(0, int(images.shape[0]), batch_size):
            yield images[start : start + batch_size]

    return from_array


def _all_layers(model: keras.layers.Layer) -> Iterable[keras.layers.Layer]:
    """Every layer inside ``model``, recursively, nested models and custom layers included."""
    return model._flatten_layers(include_self=False, recursive=True)


# --- the training model -----------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
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
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if method == "dann":
            if domain_classifier is None:
                raise ValueError("method 'dann' needs a domain_classifier")
            if not any(isinstance(x, GradientReversal) for x in _all_layers(domain_classifier)):
                raise ValueError(
                    "the domain classifier has no GradientReversal layer: without it the "
                    "features would be trained to help the domain classifier, not to fool it"
                )
        elif domain_classifier is not None:
            raise ValueError(f"method {method!r} does not use a domain_classifier")
        self.features = features
        self.head = head
        self.domain_classifier = domain_classifier
        self.method = method
        self.weight = float(weight)
        self.mmd_bandwidths = None if mmd_bandwidths is None else [float(b) for b in mmd_bandwidths]
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        alignment_name = "domain_loss" if method == "dann" else "alignment_loss"
        self.alignment_loss_tracker = keras.metrics.Mean(name=alignment_name)
        self.domain_accuracy_tracker = (
            keras.metrics.BinaryAccuracy(name="domain_accuracy", threshold=0.0)
            if method == "dann"
            else None
        )
        self._adaptation_metric_names = {"task_loss", alignment_name, "domain_accuracy"}
        if all(part.built for part in (features, head, domain_classifier) if part is not None):
            self.built = True

    def call(self, inputs, training=None):
        return self.head(self.features(inputs, training=training), training=training)

    # -- training ------------------------------------------------------------------------------

    def train_step(self, data):
        x, y, sample_weight, target = _unpack_adaptation_batch(data)
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
        with tf.GradientTape() as tape:
            both = ops.concatenate([x, target], axis=0)
            features = self.features(both, training=True)
            source_features, target_features = features[:n_source], features[n_source:]
            y_pred = self.head(source_features, training=True)
            # Keras scales the compiled loss by 1 / replicas; the alignment term follows suit.
            task_loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            alignment = self._alignment_loss(source_features, target_features)
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

    def _alignment_loss(self, source_features, target_features):
        if self.method == "coral":
            return coral_loss(source_features, target_features)
        if self.method == "mmd":
            return mmd_loss(source_features, target_features, bandwidths=self.mmd_bandwidths)
        both = ops.concatenate([source_features, target_features], axis=0)
        logits = _at_least_float32(self.domain_classifier(both, training=True))
        domains = ops.concatenate(
            [
                ops.zeros((ops.shape(source_features)[0], 1), logits.dtype),
                ops.ones((ops.shape(target_features)[0], 1), logits.dtype),
            ],
            axis=0,
        )
        self.domain_accuracy_tracker.update_state(domains, logits)
        return ops.mean(keras.losses.binary_crossentropy(domains, logits, from_logits=True))

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
        if _is_adaptation_batch(data_batch):
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


def _is_adaptation_batch(data) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], (tuple, list))
        and len(data[0]) in (2, 3)
    )


def _unpack_adaptation_batch(data):
    if not _is_adaptation_batch(data):
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
