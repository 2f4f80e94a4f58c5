"""Statistics for a clinical evaluation: uncertainty, operating points and calibration.

A single AUROC on one test set says little on its own: a reader needs to know how precise it is
(DeLong and bootstrap intervals), whether one model really beats another on the same images
(paired DeLong), how the model behaves at the threshold a clinic would use (operating points
with Wilson intervals), and whether its probabilities can be taken at face value (calibration,
temperature scaling). Pure numpy / scipy / pandas, so it runs without TensorFlow.

Conventions: ``y`` holds binary labels (1 = positive) unless a function says otherwise, and a
threshold ``t`` calls an image positive when ``score >= t``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from scipy.stats import norm, rankdata

THRESHOLD_RULES = ("youden", "sensitivity", "specificity", "fixed")


def _binary(y: np.ndarray, score: np.ndarray, *, both_classes: bool = True):
    """Labels as 0/1 ints and scores as floats, checked once so every function fails alike."""
    y = np.asarray(y)
    score = np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or y.shape != score.shape:
        raise ValueError(f"labels {y.shape} and scores {score.shape} must be the same 1-D shape")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("labels must be 0 (negative) or 1 (positive)")
    y = y.astype(np.int64)
    if both_classes and len(np.unique(y)) < 2:
        raise ValueError("labels must contain both classes")
    return y, score


def _z(level: float) -> float:
    """The two-sided normal quantile, e.g. 1.96 for ``level=0.95``."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(norm.ppf(0.5 + level / 2))


# --- DeLong -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AurocCI:
    """AUROC with its DeLong variance and a Wald interval at ``level``."""

    auc: float
    variance: float
    low: float
    high: float
    level: float


@dataclass(frozen=True)
class DeLongComparison:
    """Paired DeLong test of ``auc_a - auc_b`` on the same images."""

    auc_a: float
    auc_b: float
    difference: float
    variance: float
    z: float
    p_value: float


def _placements(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong structural components for each row of ``scores`` [R, N].

    Sun & Xu (2014): with midranks within positives (``tx``), within negatives (``ty``) and
    overall (``tz``), ``(tz - tx) / n`` is each positive's share of negatives scored below it
    (ties count half), i.e. DeLong's V10, and ``1 - (tz - ty) / m`` is each negative's V01.
    Sorting instead of comparing all m * n pairs makes this O(N log N).
    """
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if min(m, n) < 2:
        raise ValueError("DeLong needs at least two positives and two negatives")
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    v10 = (tz[:, :m] - rankdata(pos, axis=1)) / n
    v01 = 1.0 - (tz[:, m:] - rankdata(neg, axis=1)) / m
    return v10.mean(axis=1), v10, v01


def _delong_covariance(v10: np.ndarray, v01: np.ndarray) -> np.ndarray:
    """DeLong (1988) covariance of the AUCs: S10 / m + S01 / n."""
    return np.atleast_2d(np.cov(v10)) / v10.shape[1] + np.atleast_2d(np.cov(v01)) / v01.shape[1]


def delong_auroc(y: np.ndarray, score: np.ndarray, level: float = 0.95) -> AurocCI:
    """AUROC with the DeLong variance, for a CI that needs no resampling.

    The interval is the plain Wald ``auc ± z * sqrt(variance)`` clipped to [0, 1]: it is the
    interval most clinical papers report, so numbers are comparable. Near AUC 1 it is too
    optimistic (a logit-scale interval would respect the boundary), and with perfect separation
    the variance is 0 and the interval collapses to a point; use ``bootstrap_ci`` alongside when
    the test set is small or the AUC extreme.
    """
    y, score = _binary(y, score)
    auc, v10, v01 = _placements(y, score[None, :])
    variance = float(_delong_covariance(v10, v01)[0, 0])
    half = _z(level) * np.sqrt(variance)
    auc = float(auc[0])
    return AurocCI(auc, variance, max(0.0, auc - half), min(1.0, auc + half), level)


def paired_delong(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray) -> DeLongComparison:
    """Two-sided DeLong test of two models scored on the same images.

    Errors of two models on the same images are correlated, so comparing their separate CIs is
    wrong; the covariance term accounts for it. When the variance of the difference is 0 (e.g.
    identical scores) the result is z = 0, p = 1 if the AUCs are equal and z = ±inf, p = 0
    otherwise, rather than NaN. Tiny negative variances from rounding are clipped to 0.
    """
    y, score_a = _binary(y, score_a)
    _, score_b = _binary(y, score_b)
    aucs, v10, v01 = _placements(y, np.stack([score_a, score_b]))
    cov = _delong_covariance(v10, v01)
    difference = float(aucs[0] - aucs[1])
    variance = max(0.0, float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    if variance > 0:
        z = float(difference / np.sqrt(variance))
    else:
        z = 0.0 if difference == 0 else float(np.copysign(np.inf, difference))
    p_value = float(2 * norm.sf(abs(z)))
    return DeLongComparison(float(aucs[0]), float(aucs[1]), difference, variance, z, p_value)


# --- Bootstrap ----------------------------------------------------------------------------------


def _stratified_resamples(
    y: np.ndarray, clusters: np.ndarray, n_resamples: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Image indices of each resample: clusters drawn with replacement within their stratum.

    Strata are clusters with and without a positive image, each resampled to its own size, so
    every resample holds both classes and the prevalence of the test set.
    """
    codes = np.unique(clusters, return_inverse=True)[1]
    has_positive = np.bincount(codes, weights=y) > 0
    strata = [np.flatnonzero(has_positive), np.flatnonzero(~has_positive)]
    if min(len(s) for s in strata) == 0:
        raise ValueError("need clusters both with and without a positive image")
    for _ in range(n_resamples):
        chosen = np.concatenate([s[rng.integers(0, len(s), len(s))] for s in strata])
        copies = np.bincount(chosen, minlength=len(has_positive))[codes]
        yield np.repeat(np.arange(len(y)), copies)


def bootstrap_ci(
    y: np.ndarray,
    score: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    n_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(y, score)``, for any metric.

    Positives and negatives are resampled separately so every resample has both classes (AUROC
    is undefined otherwise) and the test prevalence. Several images of one patient are not
    independent: pass ``clusters`` (one id per image, e.g. patient ids) to resample whole
    patients, stratified by whether they have any positive image; image-level resampling would
    then give intervals that are too narrow. Deterministic for a given ``seed``.
    """
    y, score = _binary(y, score)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    clusters = np.arange(len(y)) if clusters is None else np.asarray(clusters)
    if clusters.shape != y.shape:
        raise ValueError(f"clusters {clusters.shape} must have one id per image {y.shape}")
    rng = np.random.default_rng(seed)
    values = [
        statistic(y[i], score[i]) for i in _stratified_resamples(y, clusters, n_resamples, rng)
    ]
    low, high = np.quantile(values, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


# --- Operating points ---------------------------------------------------------------------------


def _counts_by_threshold(y: np.ndarray, score: np.ndarray):
    """Candidate thresholds (descending) with true positives and true negatives at each.

    Candidates are the distinct scores plus +inf (nothing positive): every way a threshold can
    split these images is represented by the score that defines it.
    """
    thresholds = np.append(np.inf, np.unique(score)[::-1])
    pos, neg = np.sort(score[y == 1]), np.sort(score[y == 0])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    tn = np.searchsorted(neg, thresholds, side="left")
    return thresholds, tp, tn


def choose_threshold(
    y_val: np.ndarray, score_val: np.ndarray, rule: str, value: float | None = None
) -> float:
    """An operating threshold picked on validation data, so the test set stays untouched.

    Rules: ``"youden"`` maximises sensitivity + specificity - 1 (ties go to the highest
    threshold); ``"sensitivity"`` is the highest threshold with sensitivity >= ``value`` (the
    most specific way to reach a screening target); ``"specificity"`` is the lowest threshold
    with specificity >= ``value`` (the most sensitive way to cap false alarms); ``"fixed"``
    returns ``value``. The result is one of the validation scores (or +inf when only calling
    nothing positive meets a specificity target), to be applied as ``score >= threshold``.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"rule must be one of {THRESHOLD_RULES}, got {rule!r}")
    if rule != "youden" and value is None:
        raise ValueError(f"rule {rule!r} needs a value")
    if rule == "fixed":
        return float(value)
    if rule != "youden" and not 0 <= value <= 1:
        raise ValueError(f"a target {rule} must be in [0, 1], got {value}")
    y, score = _binary(y_val, score_val)
    thresholds, tp, tn = _counts_by_threshold(y, score)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if rule == "youden":
        # (sens + spec - 1) * n_pos * n_neg in integers, so exact ties stay ties.
        return float(thresholds[np.argmax(tp * n_neg + tn * n_pos)])
    if rule == "sensitivity":
        return float(thresholds[np.flatnonzero(tp / n_pos >= value)[0]])
    return float(thresholds[np.flatnonzero(tn / n_neg >= value)[-1]])


def wilson_interval(successes: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval for a proportion, or None when ``n`` is 0.

    Unlike the Wald interval it stays inside [0, 1] and keeps near-nominal coverage for the
    small counts and extreme proportions typical of sensitivity on a few positives.
    """
    if n == 0:
        return None
    z2 = _z(level) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = np.sqrt(z2 * p * (1 - p) / n + z2**2 / (4 * n**2)) / (1 + z2 / n)
    return max(0.0, float(centre - half)), min(1.0, float(centre + half))


def confusion_metrics(
    y: np.ndarray, score: np.ndarray, threshold: float, level: float = 0.95
) -> dict:
    """Confusion counts and the rates a clinical reader asks for, at ``score >= threshold``.

    Each proportion ``name`` comes with ``name_ci``, a Wilson interval; both are None when the
    denominator is 0 (e.g. PPV when nothing is called positive). F1 and balanced accuracy are
    not binomial proportions, so they get no Wilson interval; for one, pass a function of
    ``(y, score)`` at this fixed threshold to ``bootstrap_ci``.
    """
    y, score = _binary(y, score, both_classes=False)
    called = score >= threshold
    tp, fp = int(np.sum(called & (y == 1))), int(np.sum(called & (y == 0)))
    fn, tn = int(np.sum(~called & (y == 1))), int(np.sum(~called & (y == 0)))
    result: dict = {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn}
    proportions = {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
        "accuracy": (tp + tn, len(y)),
    }
    for name, (k, n) in proportions.items():
        result[name] = k / n if n else None
        result[f"{name}_ci"] = wilson_interval(k, n, level)
    result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    sens, spec = result["sensitivity"], result["specificity"]
    result["balanced_accuracy"] = None if sens is None or spec is None else (sens + spec) / 2
    return result


# --- Calibration --------------------------------------------------------------------------------


def _outcomes_and_confidences(y: np.ndarray, p: np.ndarray):
    """What calibration compares: 1-D ``p`` is the positive-class probability against ``y``;
    2-D ``p`` [N, K] is top-label confidence against whether the top label is right (``y`` as
    class indices or one-hot)."""
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    if p.ndim == 1:
        return _binary(y, p, both_classes=False)
    labels = y.argmax(axis=1) if y.ndim == 2 else y
    return (p.argmax(axis=1) == labels).astype(np.int64), p.max(axis=1)


def reliability_bins(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> pd.DataFrame:
    """Per-bin table for a reliability diagram: where the model is over- or under-confident.

    Equal-width bins on [0, 1], each ``[bin_low, bin_high)`` except the last, which includes 1.
    Empty bins are kept (count 0, NaN means) so the table always has ``n_bins`` rows.
    Input conventions as in ``expected_calibration_error``.
    """
    outcome, confidence = _outcomes_and_confidences(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.digitize(confidence, edges[1:-1])
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(index, weights=confidence, minlength=n_bins) / count
        observed = np.bincount(index, weights=outcome, minlength=n_bins) / count
    return pd.DataFrame(
        {
            "bin_low": edges[:-1],
            "bin_high": edges[1:],
            "mean_predicted": predicted,
            "observed_frequency": observed,
            "count": count,
        }
    )


def expected_calibration_error(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Count-weighted mean gap between predicted probability and observed frequency.

    1-D ``p`` is the positive-class probability of a binary task (``y`` in {0, 1}). 2-D ``p``
    [N, K] gives the top-label ECE (confidence of the predicted class against its accuracy, as
    in Guo et al. 2017), with ``y`` as class indices or one-hot; note that for a two-column
    binary output this is not the same number as the ECE of ``p[:, 1]``.
    """
    bins = reliability_bins(y, p, n_bins)
    gaps = (bins["mean_predicted"] - bins["observed_frequency"]).abs()
    return float(np.nansum(bins["count"] * gaps) / bins["count"].sum())


def brier_score(y: np.ndarray, p: np.ndarray) -> float:
    """Mean squared error of the probabilities: calibration and discrimination in one number.

    1-D ``p``: positive-class probability, mean of ``(p - y)^2``. 2-D ``p`` [N, K] with ``y``
    as class indices or one-hot: mean over images of the squared error summed over classes
    (Brier 1950), which for a two-column binary output is twice the 1-D value.
    """
    p = np.asarray(p, dtype=np.float64)
    if p.ndim == 1:
        y, p = _binary(y, p, both_classes=False)
        return float(np.mean((p - y) ** 2))
    y = np.asarray(y)
    onehot = y if y.ndim == 2 else np.eye(p.shape[1])[y]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def probabilities_to_logits(p: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Logits recovered from stored softmax probabilities [N, K], for temperature scaling.

    ``log(p)`` differs from the model's logits by a per-image constant, to which softmax is
    blind. Probabilities below ``eps`` (underflowed to 0) are clipped, which caps those logits.
    """
    return np.log(np.clip(np.asarray(p, dtype=np.float64), eps, 1.0))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities ``softmax(logits / T)``: T > 1 softens an overconfident model."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def fit_temperature(logits_val: np.ndarray, y_val: np.ndarray) -> float:
    """The temperature minimising validation NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    One parameter fixes overconfidence without changing any ranking, so AUROC and argmax are
    untouched. ``logits_val`` is [N, K] (two columns for a binary model), ``y_val`` class
    indices or one-hot. The search is over log T in [log 0.01, log 100], where NLL is unimodal;
    an answer at a bound means the validation set is separable or uninformative.
    """
    logits = np.asarray(logits_val, dtype=np.float64)
    y = np.asarray(y_val)
    labels = y.argmax(axis=1) if y.ndim == 2 else y.astype(np.int64)
    if logits.ndim != 2 or labels.shape != (len(logits),):
        raise ValueError(f"logits {logits.shape} must be [N, K] with one label per row")

    def nll(log_t: float) -> float:
        log_p = log_softmax(logits / np.exp(log_t), axis=1)
        return -float(np.mean(log_p[np.arange(len(labels)), labels]))

    bounds = (np.log(0.01), np.log(100.0))
    return float(np.exp(minimize_scalar(nll, bounds=bounds, method="bounded").x))
