"""Alignment losses on pooled (batch, d) features: how far apart source and target batches are.

Both are plain functions of two feature batches, usable outside ``DomainAdaptationModel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import ops

MMD_MULTIPLIERS = (0.25, 0.5, 1.0, 2.0, 4.0)


def at_least_float32(x):
    """``x`` as float32, or float64 when it is: moments and losses of float16 activations
    (mixed precision) would lose the small differences they measure."""
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
    source = at_least_float32(source)
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
    source = at_least_float32(source)
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
