"""Drift monitoring (``medtransfer.monitoring``): the statistics against hand-computed values,
the reference read from a real run and from export folders, and ``monitor`` end to end on
score tables drawn from known distributions, with and without a shift."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from medtransfer import export_layout
from medtransfer.errors import MedtransferError
from medtransfer.monitoring import (
    MonitorError,
    MonitorResult,
    MonitorThresholds,
    drift,
    load_reference,
    monitor,
)
from medtransfer.monitoring.batches import batch_labels, read_scores
from medtransfer.monitoring.report import FIGURE_FILES, MONITOR_CSV, MONITOR_HTML, MONITOR_JSON
from medtransfer.rundir import open_run

PACKAGE = Path(__file__).resolve().parents[1] / "medtransfer" / "monitoring"
CLASSES = ["normal", "finding"]
# The reference distributions: per-image intensity mean and SD, OOD score, P(finding)
MEAN, MEAN_SD, STD, STD_SD = 0.45, 0.05, 0.20, 0.02
OOD_SHAPE, OOD_SCALE = 8.0, 1.5
COLUMNS = ["path", "status", "error", "sop_instance_uid", "modality", "body_part", "in_scope",
           "ood_score", "ood_percentile", "intensity_mean", "intensity_std",
           "prob_normal", "prob_finding"]  # fmt: skip
SECRET_UID = "1.2.826.0.1.3680043.99"


# --- statistics -----------------------------------------------------------------------------------


def test_psi_of_identical_distributions_is_about_zero():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=200_000), rng.normal(size=200_000)
    assert drift.psi(a, a) == 0.0
    assert 0.0 <= drift.psi(a, b) < 0.01


def test_psi_equals_the_formula_on_two_bins():
    reference = np.array([0.0] * 50 + [1.0] * 50)
    sample = np.array([0.0] * 80 + [1.0] * 20)
    expected = (0.8 - 0.5) * math.log(0.8 / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert drift.psi(reference, sample) == pytest.approx(expected, abs=1e-9)
    assert drift.psi_of_shares([0.5, 0.5], [0.8, 0.2]) == pytest.approx(expected, abs=1e-9)


def test_psi_of_a_one_sd_shift_is_significant():
    rng = np.random.default_rng(1)
    assert drift.psi(rng.normal(size=5000), rng.normal(1.0, 1.0, size=5000)) > 0.25


def test_psi_bins_are_open_ended_and_at_deciles():
    reference = np.arange(100.0)
    assert len(drift.decile_edges(reference)) == 9
    shares = drift.binned_shares(np.array([-1e9, 1e9]), drift.decile_edges(reference))
    assert shares[0] == shares[-1] == 0.5


def test_a_point_mass_is_a_bin_of_its_own():
    """All validation outputs on one value: a batch on it is stable, a batch off it on either
    side is not; a continuous reference has no point mass and no extra bin."""
    constant = np.full(50, 0.4936)
    assert drift.point_masses(constant).tolist() == [0.4936]
    assert drift.psi(constant, np.full(40, 0.4936)) == 0
    assert drift.psi(constant, np.full(40, 0.52)) > 5 and drift.psi(constant, np.full(40, 0.4)) > 5
    rng = np.random.default_rng(3)
    assert len(drift.point_masses(rng.normal(size=1000))) == 0
    mixed = np.concatenate([np.zeros(30), rng.random(70)])  # 30% of the reference at 0
    assert drift.point_masses(mixed).tolist() == [0.0]
    shares = drift.binned_shares(mixed, drift.decile_edges(mixed), drift.point_masses(mixed))
    assert shares[-1] == pytest.approx(0.3) and shares.sum() == pytest.approx(1)


def test_categorical_psi_of_a_category_unseen_in_training_is_large_and_finite():
    value = drift.categorical_psi({"DX": 100}, {"DX": 50, "MR": 50})
    floor = drift.PSI_FLOOR
    expected = (0.5 - 1) * math.log(0.5) + (0.5 - floor) * math.log(0.5 / floor)
    assert math.isfinite(value) and value > 4
    assert value == pytest.approx(expected, abs=1e-9)


def test_chi_square_rejects_an_unseen_category_and_accepts_the_same_shares():
    assert drift.chi_square_test({"DX": 900, "CR": 100}, {"DX": 50, "MR": 50})[1] < 1e-10
    statistic, p = drift.chi_square_test({"DX": 900, "CR": 100}, {"DX": 90, "CR": 10})
    assert statistic == pytest.approx(0.0, abs=1e-12) and p == pytest.approx(1.0)
    assert drift.chi_square_test({"DX": 10}, {"DX": 3}) == (0.0, 1.0)


def test_two_proportion_test_matches_the_pooled_z_formula():
    z, p = drift.two_proportion_test(30, 100, 20, 100)
    expected = 0.1 / math.sqrt(0.25 * 0.75 * (2 / 100))
    assert z == pytest.approx(expected, abs=1e-9)
    assert p == pytest.approx(2 * stats.norm.sf(expected), abs=1e-12)
    assert drift.two_proportion_test(0, 50, 0, 80) == (0.0, 1.0)


def test_ks_test_is_scipys_two_sample_test():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=300), rng.normal(0.5, 1, size=200)
    result = stats.ks_2samp(a, b)
    assert drift.ks_test(a, b) == (pytest.approx(result.statistic), pytest.approx(result.pvalue))


# --- batch labels and tables ----------------------------------------------------------------------


def test_batch_labels_are_the_shortest_unique_trailing_parts(tmp_path):
    dated = [tmp_path / "2026-11" / "scores.csv", tmp_path / "2026-12" / "scores.csv"]
    assert batch_labels(dated) == ["2026-11/scores.csv", "2026-12/scores.csv"]
    assert batch_labels([tmp_path / "a.csv", tmp_path / "b.csv"]) == ["a.csv", "b.csv"]
    mixed = [tmp_path / "x" / "s.csv", tmp_path / "y" / "s.csv", tmp_path / "t.csv"]
    assert batch_labels(mixed) == ["x/s.csv", "y/s.csv", "t.csv"]
    with pytest.raises(MonitorError, match="more than once"):
        batch_labels([tmp_path / "a.csv", tmp_path / "." / "a.csv"])


def test_a_score_table_keeps_no_paths_and_undoes_spreadsheet_escapes(tmp_path):
    table = _scores(np.random.default_rng(3), 5)
    table.loc[0, "in_scope"] = "'-odd verdict"
    file = _write(table, tmp_path / "s.csv")
    read = read_scores(file, CLASSES)
    assert "path" not in read and "sop_instance_uid" not in read and "error" not in read
    assert read.loc[0, "in_scope"] == "-odd verdict"
    assert read["intensity_mean"].dtype == np.float64
    assert np.isnan(read.loc[len(read) - 1, "ood_score"])  # an error row's empty cell


# --- the reference --------------------------------------------------------------------------------


def _profile(rng: np.random.Generator, samples: bool = True) -> dict:
    intensity = {"quantiles": [0.5], "pixels": [0.4], "image_means": [0.45]}
    if samples:
        intensity["samples"] = {
            "image_means": rng.normal(MEAN, MEAN_SD, 2000).round(6).tolist(),
            "image_stds": rng.normal(STD, STD_SD, 2000).round(6).tolist(),
        }
    return {
        "version": 2 if samples else 1,
        "images": 2000,
        "dicom_images": 2000,
        "header": {"Modality": {"CR": 200, "DX": 1800}, "BodyPartExamined": {"CHEST": 2000}},
        "intensity": intensity,
    }


def _validation(rng: np.random.Generator, n: int = 400) -> dict:
    finding = rng.beta(2, 5, n)
    return {
        "validation_scores": np.sort(rng.gamma(OOD_SHAPE, OOD_SCALE, n)).round(6).tolist(),
        "validation_probabilities": np.stack([1 - finding, finding], axis=1).round(6).tolist(),
    }


def make_export(root: Path, *, profile: dict | None = None, ood: dict | None = None) -> Path:
    """An export folder as ``medtransfer export`` lays it out, without the graph's content."""
    (root / export_layout.EXPORT_INFO).parent.mkdir(parents=True)
    (root / export_layout.EXPORT_GRAPH).write_bytes(b"")
    info = {"name": "fake", "task": "binary", "classes": CLASSES, "positive_class": "finding"}
    (root / export_layout.EXPORT_INFO).write_text(json.dumps(info))
    if profile is not None:
        (root / export_layout.EXPORT_PROFILE).write_text(json.dumps(profile))
    if ood is not None:
        (root / export_layout.EXPORT_OOD).write_text(json.dumps(ood))
    return root


@pytest.fixture
def export(tmp_path) -> Path:
    rng = np.random.default_rng(10)
    return make_export(tmp_path / "model", profile=_profile(rng), ood=_validation(rng))


def test_the_reference_of_an_export_is_what_its_files_hold(tmp_path, export):
    reference = load_reference(export)
    ood = json.loads((export / export_layout.EXPORT_OOD).read_text())
    profile = json.loads((export / export_layout.EXPORT_PROFILE).read_text())
    assert (reference.kind, reference.classes, reference.positive_class) == (
        "export", CLASSES, "finding"
    )  # fmt: skip
    np.testing.assert_allclose(reference.validation_scores, ood["validation_scores"])
    np.testing.assert_allclose(reference.validation_probabilities, ood["validation_probabilities"])
    samples = profile["intensity"]["samples"]
    np.testing.assert_allclose(reference.intensity_samples("intensity_std"), samples["image_stds"])
    assert reference.header_counts("Modality") == {"CR": 200, "DX": 1800}
    assert reference.reported_classes() == ["finding"]


def test_an_export_without_optional_files_has_no_reference_distributions(tmp_path):
    reference = load_reference(make_export(tmp_path / "bare"))
    assert reference.profile is None and reference.validation_scores is None
    assert reference.validation_probabilities is None
    assert reference.intensity_samples("intensity_mean") is None
    assert reference.header_counts("Modality") is None
    old = make_export(tmp_path / "old", profile=_profile(np.random.default_rng(0), samples=False),
                      ood={"validation_scores": [3.0, 1.0, 2.0]})  # fmt: skip
    reference = load_reference(old)
    assert reference.intensity_samples("intensity_mean") is None
    assert reference.validation_scores.tolist() == [1.0, 2.0, 3.0]
    assert reference.validation_probabilities is None


def test_what_is_not_a_model_is_a_monitor_error(tmp_path):
    assert issubclass(MonitorError, MedtransferError)
    with pytest.raises(MonitorError, match="neither"):
        load_reference(tmp_path)
    broken = make_export(tmp_path / "broken")
    (broken / export_layout.EXPORT_INFO).write_text("{not json")
    with pytest.raises(MonitorError, match="JSON"):
        load_reference(broken)
    three = {"validation_scores": [1.0], "validation_probabilities": [[0.1, 0.2, 0.7]]}
    misfit = make_export(tmp_path / "misfit", ood=three)
    with pytest.raises(MonitorError, match="do not fit"):
        load_reference(misfit)


def test_the_reference_of_a_real_run_is_what_its_files_hold(tiny_run):
    """Checked against what the run holds, whichever of the newer fields it has."""
    reference = load_reference(tiny_run)
    run = open_run(tiny_run)
    assert reference.kind == "run"
    assert reference.classes == run.info.classes
    assert reference.positive_class == run.info.positive_class
    assert reference.profile == run.profile()
    stored = run.ood_reference() or {}
    for key, loaded in (
        ("validation_scores", reference.validation_scores),
        ("validation_probabilities", reference.validation_probabilities),
    ):
        if stored.get(key) is None or len(stored[key]) == 0:
            assert loaded is None
        else:
            expected = np.sort(stored[key]) if key == "validation_scores" else stored[key]
            np.testing.assert_allclose(loaded, expected)
    samples = ((run.profile() or {}).get("intensity") or {}).get("samples")
    if samples:
        np.testing.assert_allclose(
            reference.intensity_samples("intensity_mean"), samples["image_means"]
        )
    else:
        assert reference.intensity_samples("intensity_mean") is None


def test_monitor_runs_on_a_real_run(tiny_run, tmp_path):
    rng = np.random.default_rng(4)
    table = _scores(rng, 40).rename(columns={"prob_normal": "prob_plain",
                                              "prob_finding": "prob_spot"})  # fmt: skip
    result = monitor([_write(table, tmp_path / "s.csv")], tiny_run, tmp_path / "out")
    checks = set(result.findings["check"])
    assert {"errors", "out_of_scope", "ood_score", "intensity_mean", "prevalence:spot"} <= checks
    assert result.exit_code in (0, 1)
    assert (tmp_path / "out" / MONITOR_HTML).is_file()


# --- score tables drawn from known distributions --------------------------------------------------


def _scores(rng: np.random.Generator, n: int, shift: bool = False) -> pd.DataFrame:
    """``n`` rows as ``medtransfer score`` writes them (all text), the last two of them error
    rows; ``shift`` brightens the images by two SDs, doubles the OOD scores and puts a fifth
    of the files out of scope."""
    scores = rng.gamma(OOD_SHAPE, OOD_SCALE * (2 if shift else 1), n)
    finding = rng.beta(2, 5, n)
    out_of_scope = rng.random(n) < (0.2 if shift else 0.0)
    table = pd.DataFrame({
        "path": [f"incoming/DOE^JANE/{i:04d}.dcm" for i in range(n)],
        "status": "ok",
        "error": "",
        "sop_instance_uid": [f"{SECRET_UID}.{i}" for i in range(n)],
        "modality": rng.choice(["DX", "CR"], n, p=[0.9, 0.1]),
        "body_part": "CHEST",
        "in_scope": np.where(out_of_scope, "no: secondary capture (a screenshot)", "yes"),
        "ood_score": [f"{v:.4f}" for v in scores],
        "ood_percentile": [f"{v:.1f}" for v in 100 * stats.gamma.cdf(scores, OOD_SHAPE,
                                                                       scale=OOD_SCALE)],
        "intensity_mean": [f"{v:.5f}" for v in rng.normal(MEAN + 0.1 * shift, MEAN_SD, n)],
        "intensity_std": [f"{v:.5f}" for v in rng.normal(STD, STD_SD, n)],
        "prob_normal": [f"{v:.6f}" for v in 1 - finding],
        "prob_finding": [f"{v:.6f}" for v in finding],
    })  # fmt: skip
    errors = table.index[-2:]
    table.loc[errors, ["status", "error"]] = ["error", "cannot decode"]
    table.loc[errors, COLUMNS[4:]] = ""
    return table[COLUMNS]


def _write(table: pd.DataFrame, file: Path) -> Path:
    file.parent.mkdir(parents=True, exist_ok=True)
    if file.suffix == ".parquet":
        table = table.copy()
        for column in COLUMNS[7:]:
            table[column] = pd.to_numeric(table[column].replace("", None)).astype("float32")
        table.to_parquet(file, index=False)
    else:
        table.to_csv(file, index=False)
    return file


@pytest.fixture(scope="module")
def monitored(tmp_path_factory) -> MonitorResult:
    """An unshifted month, a shifted one, and a shifted batch too small to judge."""
    root = tmp_path_factory.mktemp("monitored")
    rng = np.random.default_rng(20)
    model = make_export(root / "model", profile=_profile(rng), ood=_validation(rng))
    files = [
        _write(_scores(rng, 300), root / "2026-11" / "scores.csv"),
        _write(_scores(rng, 300, shift=True), root / "2026-12" / "scores.csv"),
        _write(_scores(rng, 10, shift=True), root / "2027-01" / "scores.csv"),
    ]
    return monitor(files, model, root / "out")


def _batch(result: MonitorResult, label: str) -> pd.DataFrame:
    return result.findings[result.findings["batch"] == label].set_index("check")


def test_a_shifted_batch_alarms_on_what_shifted_and_nothing_else(monitored):
    alarmed = monitored.findings[monitored.findings["alarm"]]
    assert set(alarmed["batch"]) == {"2026-12/scores.csv"}
    assert set(alarmed["check"]) == {"out_of_scope", "ood_score", "intensity_mean"}
    assert monitored.exit_code == 1
    assert len(monitored.alarms) == 3
    assert all(alarm.startswith("2026-12/scores.csv: ") for alarm in monitored.alarms)
    assert any("intensity_mean drifted (PSI" in alarm and "KS p" in alarm
               for alarm in monitored.alarms)  # fmt: skip
    assert "2026-12/scores.csv" in str(monitored) and "monitor.html" in str(monitored)


def test_every_batch_gets_every_check_once(monitored):
    checks = ["errors", "out_of_scope", "ood_score", "intensity_mean", "intensity_std",
              "modality", "body_part", "prevalence:finding", "probability:finding"]  # fmt: skip
    assert list(monitored.findings.columns) == [
        "batch", "check", "n", "value", "reference", "psi", "statistic", "p_value", "alarm", "note"
    ]  # fmt: skip
    for label in ("2026-11/scores.csv", "2026-12/scores.csv", "2027-01/scores.csv"):
        assert list(_batch(monitored, label).index) == checks


def test_the_findings_hold_the_batch_statistics(monitored):
    calm = _batch(monitored, "2026-11/scores.csv")
    assert calm.loc["errors", ["n", "value"]].tolist() == [300, pytest.approx(2 / 300)]
    assert calm.loc["out_of_scope", "n"] == 298  # error rows have no verdict
    assert calm.loc["out_of_scope", "value"] == 0.0
    assert calm.loc["ood_score", "n"] == 298
    assert 35 < calm.loc["ood_score", "value"] < 65  # median percentile, like validation
    assert calm.loc["intensity_mean", "psi"] < 0.1
    assert calm.loc["modality", "value"] == 0.0  # no unseen modality
    shifted = _batch(monitored, "2026-12/scores.csv")
    assert shifted.loc["intensity_mean", "psi"] > 1.0
    assert shifted.loc["intensity_mean", "p_value"] < 1e-10
    assert 0.1 < shifted.loc["out_of_scope", "value"] < 0.3
    assert shifted.loc["ood_score", "value"] > 90
    assert not shifted.loc["errors", "alarm"]


def test_a_shifted_batch_of_ten_files_does_not_alarm_but_says_why(monitored):
    small = _batch(monitored, "2027-01/scores.csv")
    assert not small["alarm"].any()
    for check in ("out_of_scope", "ood_score", "intensity_mean", "probability:finding"):
        assert "too few files (8 < 30)" in small.loc[check, "note"]


def test_an_unshifted_batch_alone_gives_no_alarm(tmp_path, export):
    file = _write(_scores(np.random.default_rng(21), 300), tmp_path / "a.csv")
    result = monitor([file], export, tmp_path / "out")
    assert result.alarms == [] and result.exit_code == 0
    assert not result.findings["alarm"].any()
    assert "no drift" in str(result)
    assert json.loads((tmp_path / "out" / MONITOR_JSON).read_text())["drift"] is False


def test_ood_scores_nearer_the_training_images_do_not_alarm(tmp_path, export):
    """A batch of training images lies nearer the training features than validation images do:
    a distribution shift, but towards what the model knows."""
    table = _scores(np.random.default_rng(22), 300)
    ok = table["status"] == "ok"
    table.loc[ok, "ood_score"] = [f"{float(v) / 3:.4f}" for v in table.loc[ok, "ood_score"]]
    result = monitor([_write(table, tmp_path / "near.csv")], export, tmp_path / "out")
    ood = _batch(result, "near.csv").loc["ood_score"]
    assert ood["psi"] >= 0.25 and ood["p_value"] < 0.01 and ood["value"] < 50
    assert not ood["alarm"] and "closer to the training images" in ood["note"]
    far = table.copy()
    far.loc[ok, "ood_score"] = [f"{float(v) * 9:.4f}" for v in table.loc[ok, "ood_score"]]
    result = monitor([_write(far, tmp_path / "far.csv")], export, tmp_path / "out2")
    assert _batch(result, "far.csv").loc["ood_score", "alarm"]


def test_rounding_noise_of_a_model_with_constant_outputs_is_not_drift(tmp_path):
    """Keras in training and the exported graph differ in the seventh digit for the same image;
    for a model whose outputs hardly vary, that noise must not read as a shifted distribution,
    while a real move of 0.03 still does."""
    rng = np.random.default_rng(23)
    validation = _validation(rng, 50)
    validation["validation_probabilities"] = [[0.5063609, 0.4936391]] * 50
    model = make_export(tmp_path / "model", profile=_profile(rng), ood=validation)
    table = _scores(rng, 100)
    ok = table["status"] == "ok"
    for level, name in [(0.49363905, "noise.csv"), (0.52, "moved.csv")]:
        table.loc[ok, "prob_finding"] = f"{level}"
        table.loc[ok, "prob_normal"] = f"{1 - level}"
        _write(table, tmp_path / name)
    result = monitor([tmp_path / "noise.csv", tmp_path / "moved.csv"], model, tmp_path / "out")
    assert _batch(result, "noise.csv").loc["probability:finding", "psi"] == 0
    assert not _batch(result, "noise.csv")["alarm"].any()
    assert _batch(result, "moved.csv").loc["probability:finding", "alarm"]


def test_a_rerun_replaces_the_outputs(tmp_path, export):
    rng = np.random.default_rng(22)
    shifted = _write(_scores(rng, 300, shift=True), tmp_path / "shifted.csv")
    calm = _write(_scores(rng, 300), tmp_path / "calm.csv")
    assert monitor([shifted], export, tmp_path / "out").exit_code == 1
    assert monitor([calm], export, tmp_path / "out").exit_code == 0
    record = json.loads((tmp_path / "out" / MONITOR_JSON).read_text())
    assert record["drift"] is False and [b["label"] for b in record["batches"]] == ["calm.csv"]


def test_older_tables_skip_the_checks_they_cannot_support(tmp_path, export):
    rng = np.random.default_rng(23)
    no_intensity = _scores(rng, 300, shift=True).drop(columns=["intensity_mean", "intensity_std"])
    oldest = _scores(rng, 300).drop(columns=COLUMNS[4:11])
    files = [_write(no_intensity, tmp_path / "a.csv"), _write(oldest, tmp_path / "b.csv")]
    result = monitor(files, export, tmp_path / "out")
    a, b = _batch(result, "a.csv"), _batch(result, "b.csv")
    for check in ("intensity_mean", "intensity_std"):
        assert "no intensity" in a.loc[check, "note"] and a.loc[check, "n"] == 0
    assert a.loc["ood_score", "alarm"]  # the checks that can run still do
    for check in ("out_of_scope", "ood_score", "intensity_mean", "modality", "body_part"):
        assert "scored by an older medtransfer" in b.loc[check, "note"]
        assert not b.loc[check, "alarm"]
    assert b.loc["prevalence:finding", "n"] == 298


def test_a_model_without_reference_distributions_skips_those_checks(tmp_path):
    bare = make_export(tmp_path / "bare")
    file = _write(_scores(np.random.default_rng(24), 300, shift=True), tmp_path / "s.csv")
    result = monitor([file], bare, tmp_path / "out")
    table = _batch(result, "s.csv")
    assert "no OOD reference" in table.loc["ood_score", "note"]
    assert "no intensity samples" in table.loc["intensity_mean", "note"]
    assert "no validation probabilities" in table.loc["prevalence:finding", "note"]
    assert set(result.findings.loc[result.findings["alarm"], "check"]) == {"out_of_scope"}


def test_a_parquet_table_gives_the_findings_of_its_csv(tmp_path, export):
    table = _scores(np.random.default_rng(25), 300, shift=True)
    files = [
        _write(table, tmp_path / "csv" / "s.csv"),
        _write(table, tmp_path / "pq" / "s.parquet"),
    ]
    result = monitor(files, export, tmp_path / "out")
    csv, parquet = _batch(result, "s.csv"), _batch(result, "s.parquet")
    assert csv["n"].tolist() == parquet["n"].tolist()
    assert csv["alarm"].tolist() == parquet["alarm"].tolist()
    # float32 cells round to the 1e-4 resolution (checks.RESOLUTION) differently from their
    # text when the text ends on a half: a few values move one step
    np.testing.assert_allclose(csv["psi"], parquet["psi"], atol=5e-3)


def test_inputs_that_cannot_be_monitored_are_monitor_errors(tmp_path, export):
    good = _write(_scores(np.random.default_rng(26), 40), tmp_path / "good.csv")
    with pytest.raises(MonitorError, match="not a file"):
        monitor([tmp_path / "missing.csv"], export, tmp_path / "out")
    other = _scores(np.random.default_rng(26), 40).rename(columns={"prob_finding": "prob_other"})
    with pytest.raises(MonitorError, match="probability columns"):
        monitor([_write(other, tmp_path / "other.csv")], export, tmp_path / "out")
    with pytest.raises(MonitorError, match="no path"):
        monitor([_write(pd.DataFrame({"a": [1]}), tmp_path / "x.csv")], export, tmp_path / "out")
    with pytest.raises(MonitorError, match="more than once"):
        monitor([good, good], export, tmp_path / "out")
    with pytest.raises(MonitorError, match="neither"):
        monitor([good], tmp_path / "nowhere", tmp_path / "out")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(MonitorError, match="cannot be read"):
        monitor([tmp_path / "garbage.parquet"], export, tmp_path / "out")


def test_thresholds_decide_the_alarms(tmp_path, export):
    file = _write(_scores(np.random.default_rng(27), 300, shift=True), tmp_path / "s.csv")
    lenient = MonitorThresholds(psi_alarm=100.0, max_out_of_scope=0.5)
    assert monitor([file], export, tmp_path / "a", lenient).alarms == []
    strict = MonitorThresholds(min_files=1000)
    assert monitor([file], export, tmp_path / "b", strict).alarms == []


def test_a_scope_share_counts_only_files_with_a_verdict(tmp_path, export):
    table = _scores(np.random.default_rng(28), 42)  # 40 ok rows and 2 error rows
    table.loc[:3, "in_scope"] = "no: modality MR (trained on CR, DX)"
    table.loc[4:5, "in_scope"] = "unknown: not a DICOM file"
    result = monitor([_write(table, tmp_path / "s.csv")], export, tmp_path / "out")
    row = _batch(result, "s.csv").loc["out_of_scope"]
    assert (row["n"], row["value"]) == (40, pytest.approx(4 / 40))
    assert row["alarm"] and "2 of 40 files of unknown scope" in row["note"]


# --- outputs --------------------------------------------------------------------------------------


def test_no_output_holds_a_path_or_a_per_file_value(monitored):
    """Text outputs only: the PNGs (and their base64 copies in the page) are compressed pixels,
    where any three bytes turn up by chance; they draw aggregates only."""
    for name in (MONITOR_CSV, MONITOR_JSON, MONITOR_HTML):
        text = (monitored.out_dir / name).read_text()
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]*", "", text)
        assert "DOE" not in text and "JANE" not in text, name
        assert SECRET_UID not in text and "incoming" not in text, name


def test_the_outputs_are_written_and_the_json_is_strict(monitored):
    out = monitored.out_dir
    names = {file.name for file in out.iterdir()}
    assert {MONITOR_CSV, MONITOR_JSON, MONITOR_HTML, *FIGURE_FILES.values()} == names
    record = json.loads((out / MONITOR_JSON).read_text())  # strict: no NaN tokens
    assert "NaN" not in (out / MONITOR_JSON).read_text()
    assert record["drift"] is True and record["alarms"] == monitored.alarms
    assert record["thresholds"] == {"psi_alarm": 0.25, "alpha": 0.01, "max_out_of_scope": 0.05,
                                    "max_prevalence_shift": 0.1, "min_files": 30}  # fmt: skip
    shifted = record["batches"][1]
    assert shifted["label"] == "2026-12/scores.csv"
    assert (shifted["files"], shifted["ok"], shifted["error"]) == (300, 298, 2)
    assert 30 < shifted["out_of_scope"] < 90
    assert len(record["findings"]) == len(monitored.findings) == 27
    assert record["model"].endswith("model")
    csv = pd.read_csv(out / MONITOR_CSV, keep_default_na=False)
    assert len(csv) == 27 and csv["alarm"].sum() == 3


def test_the_page_names_every_batch_and_alarm_and_embeds_the_figures(monitored):
    page = (monitored.out_dir / MONITOR_HTML).read_text()
    for label in ("2026-11/scores.csv", "2026-12/scores.csv", "2027-01/scores.csv"):
        assert escape(label) in page
    for alarm in monitored.alarms:
        assert escape(alarm) in page
    assert page.count("data:image/png;base64,") == len(FIGURE_FILES)
    assert "<script" not in page.lower() and "Drift found" in page
    for file in FIGURE_FILES.values():
        assert (monitored.out_dir / file).read_bytes().startswith(b"\x89PNG")


# --- no TensorFlow, and only the allowed imports --------------------------------------------------


def test_importing_the_monitor_does_not_import_tensorflow():
    code = "import medtransfer.monitoring, sys; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


ALLOWED = ("medtransfer.rundir", "medtransfer.export_layout", "medtransfer.atomic",
           "medtransfer.scope",
           "medtransfer.errors", "medtransfer.monitoring")  # fmt: skip


def test_the_monitor_imports_only_the_modules_it_may():
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in {"tensorflow", "keras"}, (path.name, name)
                if name.startswith("medtransfer."):
                    assert name.startswith(ALLOWED), (path.name, name)


def test_strict_tables_count_refused_error_rows_as_out_of_scope(tmp_path, export):
    """``score --strict`` leaves out-of-scope files unpredicted: error rows, verdict kept."""
    table = _scores(np.random.default_rng(29), 40)
    table.loc[:9, ["status", "error"]] = ["error", "out of scope: secondary capture"]
    table.loc[:9, "in_scope"] = "no: secondary capture (a screenshot)"
    table.loc[:9, COLUMNS[7:9] + COLUMNS[11:]] = ""
    result = monitor([_write(table, tmp_path / "s.csv")], export, tmp_path / "out")
    findings = _batch(result, "s.csv")
    assert findings.loc["out_of_scope", ["n", "value"]].tolist() == [38, pytest.approx(10 / 38)]
    assert findings.loc["out_of_scope", "alarm"]
    assert findings.loc["ood_score", "n"] == findings.loc["prevalence:finding", "n"] == 28
    assert findings.loc["intensity_mean", "n"] == 38  # refused files were decoded all the same


def test_an_empty_table_and_a_spreadsheet_saved_one_are_monitored(tmp_path, export):
    empty = _write(_scores(np.random.default_rng(30), 5).iloc[:0], tmp_path / "empty.csv")
    saved = tmp_path / "saved.csv"  # Excel writes a byte-order mark first
    _scores(np.random.default_rng(31), 40).to_csv(saved, index=False, encoding="utf-8-sig")
    result = monitor([empty, saved], export, tmp_path / "out")
    assert (_batch(result, "empty.csv")["n"] == 0).all()
    assert _batch(result, "saved.csv").loc["errors", "n"] == 40
    assert result.exit_code == 0 and (tmp_path / "out" / MONITOR_HTML).is_file()


def test_the_cli_defaults_are_the_thresholds_defaults() -> None:
    """cli.py spells the defaults out (building its parser must not import pandas and SciPy)."""
    from medtransfer import cli

    parser = cli.build_parser()
    args = parser.parse_args(["monitor", "a.csv", "--model", "m", "--out", "o"])
    default = MonitorThresholds()
    for name, *_ in cli._MONITOR_THRESHOLDS.values():
        assert getattr(args, name) == getattr(default, name), name


def test_hostile_score_tables_are_one_clear_error_or_a_result(tmp_path, export):
    """A FIFO is refused without being opened (opening one blocks); a table cut mid-row or with
    flipped bytes is read or refused in one line; a formula-looking label is not a formula."""
    os.mkfifo(tmp_path / "fifo.csv")
    with pytest.raises(MonitorError, match="not a file"):
        monitor([tmp_path / "fifo.csv"], export, tmp_path / "out")
    text = _write(_scores(np.random.default_rng(40), 60), tmp_path / "full.csv").read_bytes()
    (tmp_path / "cut.csv").write_bytes(text[: len(text) // 2 + 7])
    result = monitor([tmp_path / "cut.csv"], export, tmp_path / "out_cut")
    assert 0 < result.files < 60
    flipped = bytearray(text)
    flipped[200:260] = bytes(b ^ 0xFF for b in flipped[200:260])
    (tmp_path / "flipped.csv").write_bytes(bytes(flipped))
    try:
        monitor([tmp_path / "flipped.csv"], export, tmp_path / "out_flip")
    except MonitorError as error:
        assert "cannot be read" in str(error) and "\n" not in str(error)
    formula = _write(_scores(np.random.default_rng(41), 40), tmp_path / "=HYPERLINK(1).csv")
    monitor([formula], export, tmp_path / "out_formula")
    cells = (tmp_path / "out_formula" / "monitor.csv").read_text()
    assert "\n=HYPERLINK" not in cells and ",=HYPERLINK" not in cells
