"""Drift statistics: how far a batch's distribution lies from the model's reference, and whether
the difference is more than the noise of a batch of that size.

Two kinds of number answer two questions. The population stability index (PSI) says how large
a shift is, whatever the batch size: under 0.1 is usually read as stable, 0.1 to 0.25 as a
moderate shift, 0.25 and above as a significant one. A test (two-sample Kolmogorov-Smirnov,
chi-square goodness of fit, two-proportion z) says whether a batch of that size could show the
difference by chance: PSI alone alarms on small batches, a test alone on trivial shifts in
large ones, so the checks require both.

Pure NumPy and SciPy, nothing about files or models.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from scipy import stats

PSI_BINS = 10  # bins at the reference's deciles
PSI_FLOOR = 1e-4  # an empty bin counts as this share: ln(0) would make one empty bin infinite


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).ravel()
    return values[np.isfinite(values)]


def quantised(values: np.ndarray, resolution: float) -> np.ndarray:
    """``values`` rounded to multiples of ``resolution``: differences below it count as none."""
    return np.round(np.asarray(values, dtype=np.float64) / resolution) * resolution


def decile_edges(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """The inner bin edges at the reference's quantiles; the outer bins are open-ended, so a
    batch value beyond the reference's range still lands in a bin. Tied quantiles (a reference
    with repeated values) merge their bins rather than leave bins no value can reach."""
    return np.unique(np.quantile(_finite(reference), np.arange(1, bins) / bins))


def point_masses(reference: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Values that hold at least one bin's share of the reference on their own (a model whose
    output hardly varies puts all its validation images on one value)."""
    values, counts = np.unique(_finite(reference), return_counts=True)
    return values[counts * bins >= max(counts.sum(), 1)]


def binned_shares(
    values: np.ndarray, edges: np.ndarray, points: np.ndarray | None = None
) -> np.ndarray:
    """The share of ``values`` in each bin; a value on an edge belongs to the bin above it.
    Each of ``points`` is a bin of its own (after the others), so a batch that moves off a
    point mass shows on either side of it rather than sharing its bin."""
    values = _finite(values)
    points = np.empty(0) if points is None else points
    index = np.searchsorted(edges, values, side="right")
    on_point = np.isin(values, points)
    index[on_point] = len(edges) + 1 + np.searchsorted(points, values[on_point])
    return np.bincount(index, minlength=len(edges) + 1 + len(points)) / max(len(values), 1)


def psi_of_shares(expected: np.ndarray, actual: np.ndarray, floor: float = PSI_FLOOR) -> float:
    """PSI = sum over bins of (actual - expected) * ln(actual / expected), shares floored."""
    expected = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    actual = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi(
    reference: np.ndarray, sample: np.ndarray, bins: int = PSI_BINS, floor: float = PSI_FLOOR
) -> float:
    """PSI of a continuous ``sample`` against ``reference``, binned at the reference's deciles
    (non-finite values are left out of both)."""
    reference, sample = _finite(reference), _finite(sample)
    if len(reference) == 0 or len(sample) == 0:
        raise ValueError("PSI needs at least one finite value on each side")
    edges, points = decile_edges(reference, bins), point_masses(reference, bins)
    expected, actual = binned_shares(reference, edges, points), binned_shares(sample, edges, points)
    return psi_of_shares(expected, actual, floor)


def _aligned(
    reference_counts: Mapping[str, int], sample_counts: Mapping[str, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Counts over the union of both sides' categories, in one order."""
    categories = sorted(set(reference_counts) | set(sample_counts))
    reference = np.array([reference_counts.get(c, 0) for c in categories], dtype=np.float64)
    sample = np.array([sample_counts.get(c, 0) for c in categories], dtype=np.float64)
    if reference.sum() <= 0 or sample.sum() <= 0:
        raise ValueError("categorical drift needs at least one count on each side")
    return reference, sample


def categorical_psi(
    reference_counts: Mapping[str, int], sample_counts: Mapping[str, int], floor: float = PSI_FLOOR
) -> float:
    """PSI over the union of categories: a category the reference never saw counts as the
    floor there, so it weighs heavily (as it should) without making the index infinite."""
    reference, sample = _aligned(reference_counts, sample_counts)
    return psi_of_shares(reference / reference.sum(), sample / sample.sum(), floor)


def ks_test(reference: np.ndarray, sample: np.ndarray) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov statistic and p-value."""
    result = stats.ks_2samp(_finite(reference), _finite(sample))
    return float(result.statistic), float(result.pvalue)


def chi_square_test(
    reference_counts: Mapping[str, int], sample_counts: Mapping[str, int], floor: float = PSI_FLOOR
) -> tuple[float, float]:
    """Chi-square goodness of fit of the sample's counts to the reference's shares.

    The reference is a large training set, so its shares are taken as the expected ones (not
    a two-sample test); a share floored like PSI's keeps a category unseen in training from
    dividing by zero. One category on both sides is a perfect fit."""
    reference, sample = _aligned(reference_counts, sample_counts)
    if len(reference) < 2:
        return 0.0, 1.0
    shares = np.maximum(reference / reference.sum(), floor)
    expected = shares / shares.sum() * sample.sum()
    result = stats.chisquare(sample, expected)
    return float(result.statistic), float(result.pvalue)


def two_proportion_test(
    hits: int, n: int, reference_hits: int, reference_n: int
) -> tuple[float, float]:
    """Pooled two-proportion z statistic and two-sided p-value (z 0, p 1 when both
    proportions are 0 or both 1: nothing varies, nothing differs)."""
    if n <= 0 or reference_n <= 0:
        raise ValueError("a proportion needs at least one observation on each side")
    pooled = (hits + reference_hits) / (n + reference_n)
    spread = np.sqrt(pooled * (1 - pooled) * (1 / n + 1 / reference_n))
    if spread == 0:
        return 0.0, 1.0
    z = (hits / n - reference_hits / reference_n) / spread
    return float(z), float(2 * stats.norm.sf(abs(z)))
