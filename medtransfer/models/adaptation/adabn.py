"""AdaBN (Li et al. 2016): re-estimate BatchNormalization statistics on target images.

A feature shift between sites shows up first in the statistics BatchNormalization layers
normalise with; replacing the source's moving statistics with the target's needs no labels and
no training, and leaves every learnt weight alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from medtransfer.models.adaptation.losses import at_least_float32
from medtransfer.models.adaptation.moments import Moments
from medtransfer.models.adaptation.nested import all_layers


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
        layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)
    ]
    if not layers:
        return []
    if not all(layer.built for layer in layers):
        raise ValueError("adapt_batchnorm needs a built model (call it once on a batch first)")
    batches = _image_batches(target_images, batch_size)
    probe = _StatisticsProbe(model, layers, batch_statistics=not exact)
    with probe.hooked():
        moments = probe.one_pass(batches)
        order = probe.order
        if not order or all(moments[index].count == 0 for index in order):
            raise ValueError("adapt_batchnorm: target_images is empty")
        if not exact:
            for index in order:
                _assign_statistics(layers[index], moments[index])
        else:
            for position, index in enumerate(order):
                if position:
                    moments = probe.one_pass(batches)
                _assign_statistics(layers[index], moments[index])
    return [layers[index].name for index in order]


class _StatisticsProbe:
    """Records the moments of each BatchNormalization layer's inputs during a forward pass.

    While ``hooked``, every layer's ``call`` is replaced by one that records the moments and
    then normalises as at inference (or, with ``batch_statistics``, with the batch's own
    moments, as in training). ``order`` lists the layers' indices in the order the model calls
    them; it is filled when the forward pass is traced.
    """

    def __init__(
        self,
        model: keras.Model,
        layers: list[keras.layers.BatchNormalization],
        batch_statistics: bool,
    ):
        self.model = model
        self.layers = layers
        self.batch_statistics = batch_statistics
        self.records: list[list] = [[] for _ in layers]
        self.order: list[int] = []
        self.forward = tf.function(self._forward, reduce_retracing=True)

    @contextmanager
    def hooked(self) -> Iterator[None]:
        """The hooks in place; afterwards each layer's own ``call`` again, whatever happened."""
        saved = [layer.__dict__.get("call") for layer in self.layers]
        for index, layer in enumerate(self.layers):
            layer.call = self._hook(index, layer, layer.call)
        try:
            yield
        finally:
            for layer, previous in zip(self.layers, saved, strict=True):
                if previous is None:
                    del layer.call
                else:
                    layer.call = previous

    def _hook(
        self, index: int, layer: keras.layers.BatchNormalization, original: Callable
    ) -> Callable:
        def call(inputs, training=None, mask=None):
            if mask is not None:
                raise NotImplementedError("adapt_batchnorm does not support masked inputs")
            x = at_least_float32(inputs)
            axis = layer.axis % len(x.shape)
            axes = [i for i in range(len(x.shape)) if i != axis]
            mean, variance = ops.moments(x, axes)
            count = tf.size(x, out_type=tf.int64) // tf.cast(tf.shape(x)[axis], tf.int64)
            self.records[index].append((count, mean, variance))
            if index not in self.order:
                self.order.append(index)
            if not self.batch_statistics:
                return original(inputs, training=False, mask=mask)
            return _normalise(layer, x, mean, variance, axis)

        return call

    def _forward(self, images):
        for record in self.records:
            record.clear()
        self.model(images, training=False)
        return [list(record) for record in self.records]

    def one_pass(self, batches: Callable[[], Iterator]) -> list[Moments]:
        """Each layer's moments over all batches, as its inputs are with the current statistics."""
        moments = [Moments() for _ in self.layers]
        for images in batches():
            for accumulator, results in zip(moments, self.forward(images), strict=True):
                for count, mean, variance in results:
                    accumulator.add(int(count), np.asarray(mean), np.asarray(variance))
        return moments


def _normalise(layer: keras.layers.BatchNormalization, x, mean, variance, axis: int):
    """The layer's output in train mode: ``x`` normalised with the batch's own moments."""
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


def _assign_statistics(layer: keras.layers.BatchNormalization, moments: Moments) -> None:
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
