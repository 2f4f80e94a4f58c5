"""The clinical evaluation report: intervals, operating points chosen on val and applied to test,
calibration, subgroups, and a self-contained report.html, checked against independent
computations from the written predictions."""

from __future__ import annotations

import json
import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.special import softmax
from sklearn.metrics import average_precision_score, roc_auc_score

from medtransfer.errors import DegenerateModelWarning
from medtransfer.evaluation.clinical import (
    ClinicalSettings,
    age_band,
    calibration,
    fit_calibration_temperature,
    rank_auroc,
    subgroups,
)
from medtransfer.evaluation.report import evaluate
from medtransfer.evaluation.stats import choose_threshold
from medtransfer.evaluation.thresholds import read_thresholds
from medtransfer.rundir import EVALUATION_DIR, SPEC_FILE, THRESHOLDS_FILE
from medtransfer.spec import load_spec

SETTINGS = ClinicalSettings(bootstrap_resamples=300, target_sensitivity=0.9)


@pytest.fixture(scope="module")
def reports(tiny_run, tmp_path_factory):
    spec = load_spec(tiny_run / SPEC_FILE)
    out = tmp_path_factory.mktemp("reports")
    return {
        split: evaluate(tiny_run, spec, split=split, out_dir=out / split, settings=SETTINGS)
        for split in ("val", "test")
    }


def labels_and_scores(evaluation, positive="spot"):
    p = evaluation.predictions
    return (p["label"] == positive).to_numpy().astype(int), p[f"prob_{positive}"].to_numpy()


def test_operating_points_are_chosen_on_val_and_applied_unchanged_to_test(reports):
    y_val, p_val = labels_and_scores(reports["val"])
    y_test, p_test = labels_and_scores(reports["test"])
    points = reports["test"].metrics["operating_points"]["spot"]
    assert list(points) == ["youden", "sensitivity_0.9", "specificity_0.95", "fixed_0.5"]
    for name, (rule, value) in SETTINGS.rules().items():
        threshold = choose_threshold(y_val, p_val, rule, value)
        assert points[name]["threshold"] == threshold, name
        called = p_test >= threshold
        assert points[name]["tp"] == int(np.sum(called & (y_test == 1))), name
        assert points[name]["tn"] == int(np.sum(~called & (y_test == 0))), name
    # the validation report's own points are the same thresholds (chosen on val either way)
    same = reports["val"].metrics["operating_points"]["spot"]
    assert {k: v["threshold"] for k, v in same.items()} == {
        k: v["threshold"] for k, v in points.items()
    }


def test_auroc_and_auprc_equal_scikit_learns_on_the_written_predictions(reports):
    y, p = labels_and_scores(reports["test"])
    d = reports["test"].metrics["discrimination"]["spot"]
    assert d["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert d["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert (d["n_positive"], d["n_negative"]) == (int(y.sum()), int(len(y) - y.sum()))
    low, high = d["auroc_ci_delong"]
    assert 0 <= low <= d["auroc"] <= high <= 1
    assert d["bootstrap_unit"] == "image"  # one image per patient in this dataset


def test_thresholds_are_kept_in_the_run_for_export(reports, tiny_run):
    written = read_thresholds(reports["test"].out_dir / THRESHOLDS_FILE)
    kept = read_thresholds(tiny_run / EVALUATION_DIR / THRESHOLDS_FILE)
    assert written == kept and written["chosen_on"] == "val"
    points = reports["test"].metrics["operating_points"]["spot"]
    assert written["thresholds"]["spot"] == {k: v["threshold"] for k, v in points.items()}
    assert written["temperature"] > 0


def test_report_html_is_self_contained(reports):
    html = (reports["test"].out_dir / "report.html").read_text()
    # ROC, reliability and the Grad-CAM overlays
    assert len(re.findall(r"src='data:image/png;base64,", html)) == 3
    assert (reports["test"].out_dir / "gradcam.png").is_file()
    # The overlays are measured from the validation images without the class (all of them
    # up to 64), at the localising layer: the caption says so.
    y_val, _ = labels_and_scores(reports["val"])
    caption = re.search(r"Grad-CAM \(spot\) at (\w+), measured from the mean of (\d+) val", html)
    assert caption is not None
    assert int(caption.group(2)) == min(64, int((y_val == 0).sum())) > 0
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    assert "Operating points" in html and "youden" in html and "Wilson" in html
    summary = reports["test"].summary()
    assert "95% CI" in summary and "Youden threshold from val" in summary


def test_assess_writes_nothing_and_its_writer_gives_the_files_evaluate_wrote(
    reports, tiny_run, tmp_path
):
    from medtransfer.evaluation.assessment import assess
    from medtransfer.evaluation.report_files import write_report

    def run_files():
        return {p: p.stat().st_mtime_ns for p in tiny_run.rglob("*")}

    before = run_files()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assessment = assess(tiny_run, load_spec(tiny_run / SPEC_FILE), settings=SETTINGS)
    assert run_files() == before
    # a degenerate model is warned about, at the caller's line
    flagged = [w.filename for w in caught if issubclass(w.category, DegenerateModelWarning)]
    assert flagged == [__file__] * bool(assessment.metrics["degenerate_model"])
    assert list(assessment.figures) == ["roc", "reliability", "gradcam"]
    out = write_report(assessment, tmp_path / "again")
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(p.name for p in reports["test"].out_dir.iterdir())
    for name in written:  # the same bytes but for the evaluation time
        again, first = (out / name).read_bytes(), (reports["test"].out_dir / name).read_bytes()
        assert _untimed(again) == _untimed(first), name


def _untimed(content: bytes) -> bytes:
    return re.sub(rb"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", b"<time>", content)


def test_rank_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + 0.3 * y, 1)  # coarse scores: many ties
    assert rank_auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_subgroups_count_exactly_and_flag_small_groups():
    y = np.array([1] * 12 + [0] * 12 + [1] * 3 + [0] * 3, float)
    score = np.r_[np.linspace(0.6, 0.9, 12), np.linspace(0.1, 0.4, 12), [0.2] * 3, [0.8] * 3]
    y2, p2 = np.stack([1 - y, y], 1), np.stack([1 - score, score], 1)
    sites = {"site": ["A"] * 24 + ["B"] * 6, "one_value": ["x"] * 30}
    out = subgroups(sites, y2, p2, 1, ClinicalSettings())
    assert list(out) == ["site"]  # a column with one value says nothing
    a, b = out["site"]["A"], out["site"]["B"]
    assert (a["n_images"], a["n_positive"], a["n_negative"], a["auroc"]) == (24, 12, 12, 1.0)
    assert (b["n_images"], b["n_positive"], b["n_negative"], b["auroc"]) == (6, 3, 3, 0.0)
    assert not a["small"] and b["small"]
    # fewer than 50 images: both intervals unreliable (A's AUROC of 1 is no certainty)
    assert a["interval_unreliable"] and b["interval_unreliable"]
    relaxed = subgroups(sites, y2, p2, 1, ClinicalSettings(), min_images=20)["site"]
    assert not relaxed["A"]["interval_unreliable"] and relaxed["B"]["interval_unreliable"]


def test_age_bands():
    ages = [0, 17.9, 18, 39, 40, 79.5, 80, 101, float("nan")]
    assert [age_band(a) for a in ages] == [
        "0-17", "0-17", "18-39", "18-39", "40-59", "60-79", "80+", "80+", "missing"
    ]  # fmt: skip


def test_temperature_fitted_on_val_lowers_ece_of_an_overconfident_model():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (4000, 2))
    y = np.eye(2)[[rng.choice(2, p=q) for q in softmax(logits, axis=1)]]
    overconfident = softmax(3 * logits, axis=1)  # true temperature 3
    temperature = fit_calibration_temperature(y[:2000], overconfident[:2000], "binary")
    assert temperature == pytest.approx(3, rel=0.1)
    result = calibration(y[2000:], overconfident[2000:], "binary", 1, ClinicalSettings(),
                         temperature)  # fmt: skip
    assert result["temperature_scaled"]["ece"] < result["uncalibrated"]["ece"] / 2
    bins = pd.DataFrame(result["uncalibrated"]["bins"])
    assert bins["count"].sum() == 2000 and len(bins) == 10


def test_export_carries_the_thresholds_as_an_asset_and_in_the_model_card(
    reports, tiny_run, tmp_path
):
    from medtransfer.export import EXPORT_THRESHOLDS, export_model

    exported = export_model(tiny_run, tmp_path / "tiny" / "1")
    written = json.loads((reports["test"].out_dir / THRESHOLDS_FILE).read_text())
    assert json.loads((exported / EXPORT_THRESHOLDS).read_text()) == written
    card = (exported / "model_card.json").read_text()
    assert json.loads(card)["decision_thresholds"] == written
    assert str(tmp_path.parent) not in card and str(tiny_run) not in card  # no local paths
    markdown = (exported / "model_card.md").read_text()
    youden = read_thresholds(exported / EXPORT_THRESHOLDS)["thresholds"]["spot"]["youden"]
    shown = f"{youden:.4f}" if math.isfinite(youden) else "none (no image called positive)"
    assert f"youden {shown}" in markdown and "95% CI" in markdown


def test_calibrated_export_applies_the_temperature_and_keeps_the_decisions(
    reports, tiny_run, tmp_path
):
    import tensorflow as tf

    from medtransfer.evaluation.stats import apply_temperature, probabilities_to_logits
    from medtransfer.export import EXPORT_THRESHOLDS, export_model
    from medtransfer.models.saved import load_run_model

    written = read_thresholds(reports["test"].out_dir / THRESHOLDS_FILE)
    temperature = written["temperature"]
    exported = export_model(tiny_run, tmp_path / "cal" / "1", calibrate=True)
    images = np.random.default_rng(2).random((16, 32, 32, 1)).astype(np.float32)
    raw = load_run_model(tiny_run)(images, training=False).numpy()
    served = tf.saved_model.load(str(exported)).signatures["serving_default"]
    calibrated = served(image=tf.constant(images))["probabilities"].numpy()
    expected = apply_temperature(probabilities_to_logits(raw), temperature)
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)
    mapped = read_thresholds(exported / EXPORT_THRESHOLDS)
    assert mapped["calibrated_with_temperature"] == temperature
    for point, threshold in written["thresholds"]["spot"].items():
        new = mapped["thresholds"]["spot"][point]
        assert np.array_equal(raw[:, 1] >= threshold, calibrated[:, 1] >= new - 1e-6), point
    assert f"T = {temperature:.4f}" in (exported / "model_card.md").read_text()


def test_explained_examples_are_the_most_confident_hits_and_misses():
    from medtransfer.evaluation.cam_examples import explained_examples

    p = np.array([0.95, 0.9, 0.6, 0.3, 0.1, 0.8, 0.7, 0.2, 0.05])
    y = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0], float)
    picks = explained_examples(np.stack([1 - p, p], 1), np.stack([1 - y, y], 1), 1, 0.5, 2)
    assert picks == [("TP", 0), ("TP", 1), ("FP", 5), ("FP", 6), ("FN", 4), ("FN", 3)]


def test_gradcam_without_reference_images_falls_back_to_plain_and_says_so(reports, tiny_run):
    """With no validation image without the class, the report's overlays are plain Grad-CAM
    and the caption says so; measured from the images without it, the maps change."""
    from medtransfer.evaluation.assessment import split_rows
    from medtransfer.evaluation.cam_examples import gradcam_examples
    from medtransfer.evaluation.gradcam import localising_layer
    from medtransfer.predictor import load_predictor

    spec = load_spec(tiny_run / SPEC_FILE)
    predictor = load_predictor(tiny_run)
    rows = split_rows(spec, tiny_run, "test")
    p = reports["test"].predictions
    probabilities = p[["prob_plain", "prob_spot"]].to_numpy()
    y = p[["y_plain", "y_spot"]].to_numpy(float)

    def overlays(reference_rows):
        figure, caption = gradcam_examples(
            predictor, rows, probabilities, y, "spot", 0.5, 1, reference_rows
        )
        return [np.asarray(ax.images[-1].get_array()) for ax in figure.axes if ax.images], caption

    plain, caption = overlays(rows[:0])
    layer = localising_layer(predictor.model)
    assert caption.startswith(f"Grad-CAM (spot) at {layer}, plain (no validation images")
    normal = rows[y[:, 1] == 0]
    relative, caption = overlays(normal)
    assert f"measured from the mean of {min(64, len(normal))} validation" in caption
    assert len(plain) == len(relative) > 0
    assert max(np.abs(a - b).max() for a, b in zip(plain, relative, strict=True)) > 0.01


def test_report_opens_with_its_provenance_and_names_no_local_path(reports, tiny_run):
    from medtransfer import __version__
    from medtransfer.rundir import open_run

    metrics, info = reports["test"].metrics, open_run(tiny_run).info
    source = metrics["provenance"]
    assert source["model"] == {
        "kind": "run directory",
        "folder": tiny_run.name,
        "name": info.name,
        "backbone": info.backbone,
        "weights": info.weights,
        "seed": info.seed,
        "best_epoch": info.best_epoch,
        "best_val_auroc": info.best_val_auroc,
        "data_fingerprint": info.data_fingerprint,
    }
    assert source["medtransfer_version"] == __version__
    assert (source["split"], source["n_images"]) == ("test", metrics["n_images"])
    assert re.fullmatch(r"[0-9a-f]{16}", source["data_fingerprint"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", source["evaluated_at"])
    html = (reports["test"].out_dir / "report.html").read_text()
    assert str(tiny_run.parent) not in html and "/tmp" not in html  # the folder's name only
    top = html[: html.index("<h2>Discrimination")]
    for shown in (
        source["evaluated_at"],
        __version__,
        source["data_fingerprint"],
        info.data_fingerprint,
        info.backbone,
        f"best epoch {info.best_epoch}",
    ):
        assert shown in top, shown  # fmt: skip
    assert "Prevalence" in top and "6 / 12 (50.0%)" in top  # test and val: 6 of 12 with spot


def test_thresholds_record_the_validation_split_they_were_chosen_on(reports):
    chosen = reports["test"].metrics["threshold_selection"]
    y_val, _ = labels_and_scores(reports["val"])
    assert chosen["n_images"] == len(y_val)
    assert chosen["classes"]["spot"] == {
        "n_positive": int(y_val.sum()),
        "n_negative": int(len(y_val) - y_val.sum()),
        "prevalence": pytest.approx(y_val.mean()),
    }


def test_operating_points_have_plain_names_and_flag_a_missed_target(reports):
    from medtransfer.evaluation.html_report import render_report

    metrics = json.loads((reports["test"].out_dir / "metrics.json").read_text())
    points = metrics["operating_points"]["spot"]
    assert [m["label"] for m in points.values()] == [
        "Youden (balanced sensitivity and specificity)",
        "target sensitivity 90%",
        "target specificity 95%",
        "fixed threshold 0.5",
    ]
    for m in points.values():
        if target := m.get("target"):
            observed = m[target["rate"]]
            assert target["met"] == (observed is not None and observed >= target["value"])
    html = (reports["test"].out_dir / "report.html").read_text()
    assert "target sensitivity 90%" in html and "class='confusion'" in html
    assert html.count("<table class='confusion'>") == len(points)
    # a target reached on validation and missed here is flagged (the demo's 0.925 for 0.95)
    missed = points["sensitivity_0.9"]
    missed.update(sensitivity=0.85, target={"rate": "sensitivity", "value": 0.9, "met": False})
    page = render_report(metrics, {}, "missed")
    assert "target missed here: sensitivity 0.850 &lt; 0.9" in page


def test_small_subgroups_are_shown_as_unreliable_not_certain(reports):
    from medtransfer.evaluation.html_report import render_report

    metrics = json.loads((reports["test"].out_dir / "metrics.json").read_text())
    group = {"n_images": 8, "n_positive": 4, "n_negative": 4, "auroc": 1.0,
             "auroc_ci_delong": [1.0, 1.0], "small": True, "interval_unreliable": True}  # fmt: skip
    large = {**group, "n_images": 400, "n_positive": 200, "n_negative": 200, "small": False,
             "interval_unreliable": False, "auroc_ci_delong": [0.9, 1.0]}  # fmt: skip
    metrics["subgroups"] = {"site": {"a": group, "b": large}}
    page = render_report(metrics, {}, "subgroups")
    rows = re.findall(r"<tr><td>site = (\w)</td>(.*?)</tr>", page)
    assert [name for name, _ in rows] == ["a", "b"]
    shown = "<span class='unreliable'>1.000 (<span class='ci'>1.000&ndash;1.000</span>)</span>"
    assert shown in rows[0][1]
    assert "interval unreliable" in rows[0][1] and "interval unreliable" not in rows[1][1]


def test_roc_figure_marks_the_operating_points():
    from medtransfer.evaluation.plots import roc_figure

    y = np.array([0, 0, 1, 1, 0, 1], float)
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    points = {"spot": {"Youden": (0.0, 0.67), "target sensitivity 95%": (0.33, 1.0)}}
    figure = roc_figure(np.stack([1 - y, y], 1), np.stack([1 - p, p], 1), ["plain", "spot"],
                        task="binary", points=points)  # fmt: skip
    labels = [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    assert "Youden" in labels and "target sensitivity 95%" in labels
    marked = {line.get_label(): tuple(line.get_xydata()[0]) for line in figure.axes[0].lines}
    assert marked["target sensitivity 95%"] == (0.33, 1.0)


def test_an_exports_provenance_comes_from_its_model_card(tiny_run, tmp_path):
    """An export is named by its model and version folders, trained as its card says."""
    from medtransfer.evaluation.assessment import provenance, split_rows
    from medtransfer.predictor import ModelInfo
    from medtransfer.rundir import open_run

    info = open_run(tiny_run).info
    exported = tmp_path / "tiny" / "3"
    exported.mkdir(parents=True)
    training = {"backbone": "resnet50", "weights": "imagenet", "seed": 7, "best_epoch": 4,
                "best_val_auroc": 0.9, "data_fingerprint": "0123456789abcdef"}  # fmt: skip
    (exported / "model_card.json").write_text(json.dumps({"training": training}))
    rows = split_rows(load_spec(tiny_run / SPEC_FILE), tiny_run, "test")
    found = provenance(exported, ModelInfo.from_run_info(info), "test", rows)
    assert found["model"] == {"kind": "export", "folder": "tiny/3", "name": info.name, **training}
    assert found["n_images"] == len(rows)
