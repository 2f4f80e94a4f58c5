"""Evaluation statistics against independent references: sklearn, naive O(m*n) DeLong, closed
forms, hand-worked examples and coverage simulations with a known true AUROC."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import norm, rankdata
from sklearn.metrics import brier_score_loss, roc_auc_score

from medtransfer.evaluation.stats import (
    apply_temperature,
    bootstrap_ci,
    brier_score,
    choose_threshold,
    confusion_metrics,
    delong_auroc,
    expected_calibration_error,
    fit_temperature,
    paired_delong,
    probabilities_to_logits,
    reliability_bins,
    wilson_interval,
)

Z95 = 1.959963984540054


def fast_auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC from midranks: cheap enough for thousands of resamples."""
    m = y.sum()
    n = len(y) - m
    return (rankdata(score)[y == 1].sum() - m * (m + 1) / 2) / (m * n)


def naive_components(y: np.ndarray, score: np.ndarray):
    """DeLong placement values straight from the definition, comparing all m * n pairs."""
    x, z = score[y == 1], score[y == 0]
    psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)  # V10 (one per positive), V01 (one per negative)


def naive_delong_variance(y: np.ndarray, score: np.ndarray) -> float:
    v10, v01 = naive_components(y, score)
    return np.var(v10, ddof=1) / len(v10) + np.var(v01, ddof=1) / len(v01)


def tied_data(seed: int, n: int = 120):
    """Labels and scores rounded to one decimal, so ties within and across classes abound."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = np.round(rng.normal(y * 0.8, 1.0) / 3, 1)
    return y, score


def binormal(rng: np.random.Generator, d: float, m: int, n: int):
    """m positives ~ N(d, 1) and n negatives ~ N(0, 1): true AUROC is Phi(d / sqrt(2))."""
    y = np.r_[np.ones(m, dtype=int), np.zeros(n, dtype=int)]
    return y, np.r_[rng.normal(d, 1.0, m), rng.normal(0.0, 1.0, n)]


# --- DeLong -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_delong_auc_and_variance_match_sklearn_and_naive_definition_with_ties(seed):
    y, score = tied_data(seed)
    assert len(np.unique(score)) < 30  # many ties
    result = delong_auroc(y, score)
    assert result.auc == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert result.variance == pytest.approx(naive_delong_variance(y, score), abs=1e-12)
    half = Z95 * np.sqrt(result.variance)
    assert result.low == pytest.approx(max(0.0, result.auc - half), abs=1e-12)
    assert result.high == pytest.approx(min(1.0, result.auc + half), abs=1e-12)


def test_delong_ci_level_and_clipping():
    y, score = tied_data(0)
    r90 = delong_auroc(y, score, level=0.90)
    half = 1.6448536269514722 * np.sqrt(r90.variance)
    assert (r90.low, r90.high) == pytest.approx((r90.auc - half, r90.auc + half), abs=1e-12)
    # Perfect separation: variance 0 and the interval collapses onto AUC 1 (never above it).
    separated = delong_auroc(np.array([0, 0, 0, 1, 1, 1]), np.array([1, 2, 3, 4, 5, 6]))
    assert (separated.auc, separated.variance, separated.low, separated.high) == (1, 0, 1, 1)
    # Nearly separated, small: the Wald interval would exceed 1 and is clipped.
    assert delong_auroc(np.array([0, 0, 0, 1, 0, 1, 1]), np.arange(7.0)).high == 1.0


def test_delong_hanley_mcneil_1982_rating_data():
    # Hanley & McNeil (1982), Table 1: 109 CT images rated 1-5, 58 normal and 51 abnormal;
    # the paper reports an area of 0.893. Only the area is checked (its SE of 0.032 comes from
    # the Hanley-McNeil approximation, not DeLong).
    y = np.r_[np.zeros(58, dtype=int), np.ones(51, dtype=int)]
    rating = np.r_[
        np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2]), np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    ]
    result = delong_auroc(y, rating)
    assert round(result.auc, 3) == 0.893
    assert result.variance == pytest.approx(naive_delong_variance(y, rating), abs=1e-12)


def test_delong_rejects_degenerate_labels():
    with pytest.raises(ValueError, match="both classes"):
        delong_auroc(np.zeros(5, dtype=int), np.arange(5.0))
    with pytest.raises(ValueError, match="two positives"):
        delong_auroc(np.array([0, 0, 0, 1]), np.arange(4.0))
    with pytest.raises(ValueError, match=r"0 \(negative\) or 1"):
        delong_auroc(np.array([0, 2, 0, 1]), np.arange(4.0))


def test_paired_delong_identical_scores_is_no_difference():
    y, score = tied_data(1)
    result = paired_delong(y, score, score.copy())
    assert (result.difference, result.variance, result.z, result.p_value) == (0, 0, 0, 1)


def test_paired_delong_zero_variance_with_a_real_difference_is_p_zero():
    y = np.array([0, 0, 0, 1, 1, 1])
    result = paired_delong(y, np.arange(6.0), np.zeros(6))  # AUC 1 vs AUC 0.5, both exact
    assert (result.difference, result.variance, result.z, result.p_value) == (0.5, 0, np.inf, 0)


@pytest.mark.parametrize("seed", range(3))
def test_paired_delong_matches_naive_covariance(seed):
    y, score_a = tied_data(seed)
    score_b = np.round(score_a + np.random.default_rng(seed + 10).normal(0, 0.3, len(y)), 1)
    result = paired_delong(y, score_a, score_b)
    a10, a01 = naive_components(y, score_a)
    b10, b01 = naive_components(y, score_b)
    covariance = np.cov(a10, b10)[0, 1] / len(a10) + np.cov(a01, b01)[0, 1] / len(a01)
    expected = (
        naive_delong_variance(y, score_a) + naive_delong_variance(y, score_b) - 2 * covariance
    )
    assert result.variance == pytest.approx(expected, abs=1e-12)
    assert result.difference == pytest.approx(
        roc_auc_score(y, score_a) - roc_auc_score(y, score_b), abs=1e-12
    )
    assert result.z == pytest.approx(result.difference / np.sqrt(expected), rel=1e-9)
    assert result.p_value == pytest.approx(2 * norm.sf(abs(result.z)), rel=1e-12)
    swapped = paired_delong(y, score_b, score_a)
    assert (swapped.difference, swapped.p_value) == pytest.approx(
        (-result.difference, result.p_value)
    )


def test_paired_delong_detects_a_clearly_better_model():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 300)
    signal = rng.normal(0, 1, 300)
    good = y * 2.0 + signal
    weak = y * 0.5 + signal + rng.normal(0, 1, 300)  # correlated with the good model's errors
    result = paired_delong(y, good, weak)
    assert result.difference > 0.15
    assert result.p_value < 0.01


# --- Bootstrap ----------------------------------------------------------------------------------


def test_bootstrap_and_delong_intervals_cover_the_true_auroc():
    d, m, n = 1.0, 50, 50
    true_auc = norm.cdf(d / np.sqrt(2))
    rng = np.random.default_rng(2024)
    boot_hits = delong_hits = 0
    n_datasets = 300
    for k in range(n_datasets):
        y, score = binormal(rng, d, m, n)
        low, high = bootstrap_ci(y, score, fast_auroc, n_resamples=200, seed=k)
        boot_hits += low <= true_auc <= high
        delong = delong_auroc(y, score)
        delong_hits += delong.low <= true_auc <= delong.high
    assert 0.88 <= boot_hits / n_datasets <= 0.99
    assert 0.88 <= delong_hits / n_datasets <= 0.99


def test_bootstrap_is_deterministic_for_a_seed():
    y, score = tied_data(4)
    first = bootstrap_ci(y, score, fast_auroc, n_resamples=300, seed=7)
    assert bootstrap_ci(y, score, fast_auroc, n_resamples=300, seed=7) == first
    assert bootstrap_ci(y, score, fast_auroc, n_resamples=300, seed=8) != first


def test_bootstrap_percentiles_of_the_resampled_statistic():
    y, score = tied_data(5)
    seen = []

    def record(y_boot, score_boot):
        seen.append(fast_auroc(y_boot, score_boot))
        return seen[-1]

    low, high = bootstrap_ci(y, score, record, n_resamples=500, seed=1, level=0.8)
    assert len(seen) == 500
    assert (low, high) == pytest.approx(tuple(np.quantile(seen, [0.1, 0.9])), abs=1e-15)


def test_bootstrap_is_stratified_by_class():
    y = np.r_[np.ones(3, dtype=int), np.zeros(37, dtype=int)]
    score = np.random.default_rng(0).normal(size=40)
    sizes = []

    def record(y_boot, score_boot):
        sizes.append((int(y_boot.sum()), len(y_boot)))
        return 0.0

    bootstrap_ci(y, score, record, n_resamples=200)
    # An unstratified bootstrap would draw no positive at all in ~13% of resamples.
    assert set(sizes) == {(3, 40)}


def test_cluster_bootstrap_keeps_both_classes_in_every_resample():
    # 3 patients each with one positive and one negative image, 20 patients with one negative.
    y = np.r_[np.tile([1, 0], 3), np.zeros(20, dtype=int)]
    clusters = np.r_[np.repeat([0, 1, 2], 2), np.arange(3, 23)]
    score = np.random.default_rng(1).normal(size=len(y))
    classes = []

    def record(y_boot, score_boot):
        classes.append(len(np.unique(y_boot)))
        return 0.0

    bootstrap_ci(y, score, record, n_resamples=300, clusters=clusters)
    assert set(classes) == {2}


def test_cluster_bootstrap_widens_intervals_for_duplicated_images():
    rng = np.random.default_rng(11)
    y, score = binormal(rng, 1.0, 20, 20)
    patients = np.arange(40)
    y5, score5, patients5 = np.repeat(y, 5), np.repeat(score, 5), np.repeat(patients, 5)
    image_low, image_high = bootstrap_ci(y5, score5, fast_auroc, n_resamples=500)
    cluster_low, cluster_high = bootstrap_ci(
        y5, score5, fast_auroc, n_resamples=500, clusters=patients5
    )
    # Five copies carry no more information than one: image resampling is about sqrt(5) too narrow.
    assert cluster_high - cluster_low > 1.8 * (image_high - image_low)
    # Resampling patients of the duplicated set is exactly resampling images of the originals
    # (same strata, same draws; AUROC ignores uniform duplication).
    patient_level = bootstrap_ci(y, score, fast_auroc, n_resamples=500)
    assert (cluster_low, cluster_high) == pytest.approx(patient_level, abs=1e-12)


def test_bootstrap_rejects_clusters_of_the_wrong_length():
    y, score = tied_data(0)
    with pytest.raises(ValueError, match="one id per image"):
        bootstrap_ci(y, score, fast_auroc, clusters=np.arange(3))


# --- Operating points ---------------------------------------------------------------------------

# Scores 0.1 ... 0.7 with labels 0 0 0 1 0 1 1: at 0.4, sens 3/3 and spec 3/4 (J = 0.75); at 0.6,
# sens 2/3 and spec 4/4 (J = 0.667); every other threshold is worse.
HAND_Y = np.array([0, 0, 0, 1, 0, 1, 1])
HAND_SCORE = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])


def rates(y, score, threshold):
    called = score >= threshold
    return called[y == 1].mean(), (~called[y == 0]).mean()


def test_youden_on_a_hand_example():
    assert choose_threshold(HAND_Y, HAND_SCORE, "youden") == 0.4


def test_youden_ties_go_to_the_highest_threshold():
    # 0.4 (sens 1, spec 3/4) and 0.6 (sens 3/4, spec 1) both give J = 0.75.
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    assert choose_threshold(y, np.arange(1, 9) / 10, "youden") == 0.6


def test_sensitivity_and_specificity_rules_on_the_hand_example():
    assert choose_threshold(HAND_Y, HAND_SCORE, "sensitivity", 2 / 3) == 0.6
    assert choose_threshold(HAND_Y, HAND_SCORE, "sensitivity", 0.9) == 0.4
    assert choose_threshold(HAND_Y, HAND_SCORE, "specificity", 0.75) == 0.4
    assert choose_threshold(HAND_Y, HAND_SCORE, "specificity", 1.0) == 0.6
    # Top score is a negative: only calling nothing positive has specificity 1.
    assert choose_threshold([1, 0], [0.2, 0.9], "specificity", 1.0) == np.inf


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_sensitivity_rule_is_the_highest_threshold_reaching_the_target(target):
    y, score = tied_data(6, n=300)
    threshold = choose_threshold(y, score, "sensitivity", target)
    assert rates(y, score, threshold)[0] >= target
    assert all(rates(y, score, s)[0] < target for s in np.unique(score) if s > threshold)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_specificity_rule_is_the_lowest_threshold_reaching_the_target(target):
    y, score = tied_data(7, n=300)
    threshold = choose_threshold(y, score, "specificity", target)
    assert rates(y, score, threshold)[1] >= target
    assert all(rates(y, score, s)[1] < target for s in np.unique(score) if s < threshold)


def test_fixed_rule_and_bad_arguments():
    assert choose_threshold(HAND_Y, HAND_SCORE, "fixed", 0.37) == 0.37
    with pytest.raises(ValueError, match="rule must be one of"):
        choose_threshold(HAND_Y, HAND_SCORE, "f1")
    with pytest.raises(ValueError, match="needs a value"):
        choose_threshold(HAND_Y, HAND_SCORE, "sensitivity")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        choose_threshold(HAND_Y, HAND_SCORE, "specificity", 90)


def wilson_by_hand(k: int, n: int, z: float = Z95):
    p = k / n
    centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


def test_wilson_interval_closed_form():
    low, high = wilson_interval(8, 10)
    assert (low, high) == pytest.approx(wilson_by_hand(8, 10), abs=1e-12)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    # Its ends are where the score test |p_hat - p0| / sqrt(p0 (1 - p0) / n) equals z.
    for p0 in (low, high):
        assert abs(0.8 - p0) / np.sqrt(p0 * (1 - p0) / 10) == pytest.approx(Z95, rel=1e-9)
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
    assert wilson_interval(0, 0) is None


def test_confusion_metrics_on_a_hand_example():
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    score = np.array([0.9, 0.5, 0.7, 0.2, 0.1, 0.5, 0.8, 0.3, 0.2, 0.1, 0.0, 0.4])
    # At 0.5 (ties count as positive): positives 0.9, 0.5, 0.7 and negatives 0.5, 0.8 are called.
    result = confusion_metrics(y, score, 0.5)
    assert (result["tp"], result["fp"], result["tn"], result["fn"]) == (3, 2, 5, 2)
    assert result["sensitivity"] == 3 / 5
    assert result["specificity"] == 5 / 7
    assert result["ppv"] == 3 / 5
    assert result["npv"] == 5 / 7
    assert result["accuracy"] == 8 / 12
    assert result["f1"] == 6 / 10
    assert result["balanced_accuracy"] == pytest.approx((3 / 5 + 5 / 7) / 2, abs=1e-15)
    assert result["sensitivity_ci"] == pytest.approx(wilson_by_hand(3, 5), abs=1e-12)
    assert result["npv_ci"] == pytest.approx(wilson_by_hand(5, 7), abs=1e-12)
    assert result["accuracy_ci"] == pytest.approx(wilson_by_hand(8, 12), abs=1e-12)


def test_confusion_metrics_empty_denominators_are_none():
    result = confusion_metrics(np.array([0, 0, 0]), np.array([0.1, 0.2, 0.3]), 0.5)
    assert (result["tn"], result["sensitivity"], result["sensitivity_ci"]) == (3, None, None)
    assert (result["ppv"], result["ppv_ci"], result["f1"]) == (None, None, None)
    assert result["balanced_accuracy"] is None
    assert result["specificity"] == 1.0


# --- Calibration --------------------------------------------------------------------------------


def test_ece_is_zero_when_every_bin_is_calibrated():
    p = np.repeat([0.05, 0.25, 0.5, 0.9], [20, 20, 10, 10])
    y = np.r_[np.repeat([1, 0], [1, 19]), np.repeat([1, 0], [5, 15]), np.repeat([1, 0], [5, 5])]
    y = np.r_[y, np.repeat([1, 0], [9, 1])]
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_binary_hand_example():
    # Bin [0, 0.5): p 0.1, 0.3, 0.35 (mean 0.25), 2 of 3 positive; bin [0.5, 1]: p 0.8, 0.9
    # (mean 0.85), 1 of 2 positive. ECE = 3/5 * |2/3 - 1/4| + 2/5 * |1/2 - 0.85| = 0.25 + 0.14.
    y = np.array([0, 1, 1, 0, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9])
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(0.39, abs=1e-12)


def test_ece_top_label_hand_example():
    # Confidences 0.7, 0.5, 0.6 all fall in [0.5, 1]; predictions 0, 1, 2 vs labels 0, 0, 2.
    p = np.array([[0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 0, 2])
    expected = abs(2 / 3 - 0.6)
    assert expected_calibration_error(labels, p, n_bins=2) == pytest.approx(expected, abs=1e-12)
    assert expected_calibration_error(np.eye(3)[labels], p, n_bins=2) == pytest.approx(expected)


def test_reliability_bins_table():
    y = np.array([0, 1, 1, 0, 1, 1])
    p = np.array([0.1, 0.3, 0.35, 0.8, 0.9, 1.0])
    bins = reliability_bins(y, p, n_bins=4)
    assert list(bins.columns) == [
        "bin_low",
        "bin_high",
        "mean_predicted",
        "observed_frequency",
        "count",
    ]
    assert bins["bin_low"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert bins["count"].tolist() == [1, 2, 0, 3]  # p = 1.0 lands in the last bin
    assert bins["mean_predicted"].tolist()[:2] == pytest.approx([0.1, 0.325])
    assert np.isnan(bins["mean_predicted"][2]) and np.isnan(bins["observed_frequency"][2])
    assert bins["observed_frequency"][3] == pytest.approx(2 / 3)
    assert reliability_bins(y, p, n_bins=2)["count"].tolist() == [3, 3]


def test_brier_score_matches_sklearn():
    rng = np.random.default_rng(8)
    y = rng.integers(0, 2, 200)
    p = rng.random(200)
    assert brier_score(y, p) == pytest.approx(brier_score_loss(y, p), abs=1e-15)
    labels = rng.integers(0, 4, 200)
    probabilities = softmax(rng.normal(size=(200, 4)), axis=1)
    expected = brier_score_loss(labels, probabilities)
    assert brier_score(labels, probabilities) == pytest.approx(expected, abs=1e-15)
    assert brier_score(np.eye(4)[labels], probabilities) == pytest.approx(expected, abs=1e-15)


def calibrated_logits(rng: np.random.Generator, n: int, k: int):
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    binary = np.c_[np.zeros(n), rng.normal(0, 1.5, n)]
    logits = binary if k == 2 else rng.normal(0, 1.0, (n, k))
    cumulative = np.cumsum(softmax(logits, axis=1), axis=1)
    labels = np.minimum((cumulative < rng.random(n)[:, None]).sum(axis=1), k - 1)
    return logits, labels


@pytest.mark.parametrize("k", [2, 4])
def test_temperature_scaling_undoes_overconfidence(k):
    logits, labels = calibrated_logits(np.random.default_rng(k), 20000, k)
    # Overconfident model, stored as float32 probabilities as the models export them.
    stored = softmax(3 * logits, axis=1).astype(np.float32)
    recovered = probabilities_to_logits(stored)
    val, test = slice(0, 10000), slice(10000, None)
    temperature = fit_temperature(recovered[val], labels[val])
    assert temperature == pytest.approx(3.0, rel=0.1)
    before = expected_calibration_error(labels[test], stored[test])
    after = expected_calibration_error(
        labels[test], apply_temperature(recovered[test], temperature)
    )
    assert after < 0.5 * before
    assert fit_temperature(logits[val], np.eye(k)[labels[val]]) == pytest.approx(1.0, rel=0.1)


def test_apply_temperature_and_probabilities_to_logits():
    logits = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 3.0]])
    np.testing.assert_allclose(apply_temperature(logits, 1.0), softmax(logits, axis=1))
    np.testing.assert_allclose(apply_temperature(logits, 2.0), softmax(logits / 2, axis=1))
    recovered = probabilities_to_logits(softmax(logits, axis=1))
    np.testing.assert_allclose(recovered - recovered[:, :1], logits - logits[:, :1], atol=1e-12)
    assert probabilities_to_logits(np.array([[0.0, 1.0]]))[0, 0] == pytest.approx(np.log(1e-12))
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(logits, 0.0)
