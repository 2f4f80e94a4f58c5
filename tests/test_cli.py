"""The CLI end to end on a small generated DICOM dataset: train -> evaluate -> export -> score,
each through the real `medtransfer` console script, checked against the shared contract
checkers; plus exit codes and the promise that patient identifiers never leave the inputs."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medtransfer.quickstart import write_spec
from medtransfer.scoring import BASE_COLUMNS, INTENSITY_COLUMNS, SCOPE_COLUMNS
from medtransfer.synthetic import generate_dicom_dataset
from medtransfer.training.checkpoint import CHECKPOINT_FILE, load_checkpoint

from .conftest import SHARED_DATA, SHARED_TOOLS

CLI = Path(sys.executable).parent / "medtransfer"


def run_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, (
        f"{args}: {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    manifest = generate_dicom_dataset(root / "data", n_patients=24, seed=5)
    spec = write_spec(manifest, backbone="mobilenetv3small", epochs=2, image_size=32, seed=5)
    paths = {
        "root": root,
        "data": manifest.parent,
        "spec": spec,
        "run": root / "run",
        "report": root / "report",
        "export": root / "models" / "quick" / "1",
        "scores": root / "scores.csv",
    }
    paths["train_out"] = run_cli("train", "--spec", str(spec), "--out", str(paths["run"])).stdout
    paths["eval_out"] = run_cli(
        "evaluate",
        str(paths["run"]),
        "--spec",
        str(spec),
        "--split",
        "test",
        "--out",
        str(paths["report"]),
    ).stdout
    run_cli("export", str(paths["run"]), "--out", str(paths["export"]))
    paths["score_out"] = run_cli(
        "score",
        str(paths["data"] / "dicom"),
        "--model",
        str(paths["export"]),
        "--out",
        str(paths["scores"]),
        "--no-progress",
    ).stdout
    return paths


def test_train_writes_a_complete_run(pipeline):
    run = pipeline["run"]
    info = json.loads((run / "run.json").read_text())
    assert info["classes"] == ["normal", "finding"] and info["epochs_run"] == 2
    assert (run / "model.keras").is_file()
    history = pd.read_csv(run / "history.csv")
    assert len(history) == 2 and {"auc", "val_auc", "loss"} <= set(history.columns)
    manifest = pd.read_csv(run / "manifest.csv")
    assert manifest.groupby("patient")["split"].nunique().max() == 1
    assert "best validation AUROC" in pipeline["train_out"]


def test_evaluate_reports_test_auroc_on_held_out_patients(pipeline):
    metrics = json.loads((pipeline["report"] / "metrics.json").read_text())
    run_manifest = pd.read_csv(pipeline["run"] / "manifest.csv")
    assert metrics["split"] == "test"
    assert metrics["n_images"] == int((run_manifest["split"] == "test").sum())
    assert 0 <= metrics["auroc"]["macro"] <= 1
    assert metrics["auroc"]["macro"] == metrics["auroc"]["per_class"]["finding"]
    predictions = pd.read_csv(pipeline["report"] / "predictions.csv")
    assert len(predictions) == metrics["n_images"]
    assert (pipeline["report"] / "roc.png").stat().st_size > 10_000
    assert "AUROC finding" in pipeline["eval_out"]


def test_export_passes_the_contract_checker(pipeline):
    result = subprocess.run(
        [sys.executable, str(SHARED_TOOLS / "check_export.py"), str(pipeline["export"])],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_scores_csv_meets_the_contract(pipeline):
    folder = pipeline["data"] / "dicom"
    result = subprocess.run(
        [
            sys.executable,
            str(SHARED_TOOLS / "check_scores.py"),
            str(folder),
            str(pipeline["scores"]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout
    scores = pd.read_csv(pipeline["scores"], keep_default_na=False)
    # the column order itself is pinned in tests/test_scoring.py
    columns = [*BASE_COLUMNS, *SCOPE_COLUMNS, *INTENSITY_COLUMNS, "prob_normal", "prob_finding"]
    assert list(scores.columns) == columns
    assert set(scores["status"]) == {"ok"}
    # the data the model was trained on is in its scope by its header; a few images may lie
    # further from the training features than the validation images did
    header_ok = scores["in_scope"].str.match(r"^(yes|no: features unlike the training images)")
    assert header_ok.all() and (scores["in_scope"] == "yes").mean() > 0.8
    assert set(scores["modality"]) == {"DX"} and set(scores["body_part"]) == {"CHEST"}
    assert (scores["ood_score"] > 0).all() and scores["ood_percentile"].between(0, 100).all()
    assert len(scores) == len(list(folder.rglob("*.dcm")))
    row = scores.iloc[0]
    ds = pydicom.dcmread(folder / row["path"], stop_before_pixels=True)
    assert row["sop_instance_uid"] == ds.SOPInstanceUID
    assert abs(row["prob_normal"] + row["prob_finding"] - 1) < 1e-5


def test_scores_match_the_evaluated_model(pipeline):
    """Scoring the folder gives the same probabilities evaluation computed for the test images."""
    predictions = pd.read_csv(pipeline["report"] / "predictions.csv")
    scores = pd.read_csv(pipeline["scores"], keep_default_na=False)
    folder = (pipeline["data"] / "dicom").resolve()
    scores["abs"] = [str(folder / p) for p in scores["path"]]
    merged = predictions.merge(scores, left_on="path", right_on="abs", suffixes=("_eval", "_score"))
    assert len(merged) == len(predictions)
    diff = (merged["prob_finding_eval"] - merged["prob_finding_score"]).abs().max()
    assert diff <= 1e-5


def test_no_patient_identifiers_in_any_output(pipeline):
    sample = pydicom.dcmread(next((pipeline["data"] / "dicom").rglob("*.dcm")))
    secrets = [str(sample.PatientName), sample.PatientID, sample.PatientBirthDate]
    manifest = pd.read_csv(pipeline["data"] / "manifest.csv", dtype=str)
    secrets += manifest["patient_id"].tolist()
    outputs = [
        p for key in ("run", "report", "export") for p in pipeline[key].rglob("*") if p.is_file()
    ]
    outputs.append(pipeline["scores"])
    for path in outputs:
        blob = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in blob, f"{secret!r} found in {path}"


def test_bad_spec_exits_2_with_the_field_named(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: x\ntask: binary\nclasses: [a, b]\ndata: {format: npz, path: no.npz}\n")
    result = run_cli("train", "--spec", str(spec), "--out", str(tmp_path / "run"), expect=2)
    assert "data.path: no.npz not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_missing_run_exits_2(tmp_path):
    result = run_cli(
        "export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m" / "1"), expect=2
    )
    assert "is not a finished medtransfer run" in result.stderr


def test_every_verb_has_help():
    for verb in (
        "train",
        "evaluate",
        "export",
        "score",
        "quickstart",
        "weights download",
        "lr-find",
    ):
        assert "usage: medtransfer " + verb in run_cli(*verb.split(), "--help").stdout


def test_weights_download_unreachable_exits_2_in_one_line(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mirror = f"http://127.0.0.1:{port}/"
    result = run_cli(
        "weights",
        "download",
        "mobilenetv3small",
        "--out",
        str(tmp_path),
        "--mirror",
        mirror,
        expect=2,
    )
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"medtransfer weights: error: cannot download {mirror}weights_mobilenet_v3_small"
        )
    )
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes_to_the_same_weights(pipeline, tmp_path):
    """The real thing: SIGKILL after the first epoch's checkpoint, then ``train --resume``."""
    run_dir = tmp_path / "run"
    command = [str(CLI), "train", "--spec", str(pipeline["spec"]), "--out", str(run_dir)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (run_dir / CHECKPOINT_FILE).exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "run.json").exists(), "the run finished before it could be killed"
    assert load_checkpoint(run_dir).state.epochs == 1
    run_cli("train", "--resume", "--out", str(run_dir))
    resumed, whole = load_checkpoint(run_dir), load_checkpoint(pipeline["run"])
    assert resumed.state.val_auc == whole.state.val_auc
    for got, want in zip(resumed.model_values, whole.model_values, strict=True):
        np.testing.assert_array_equal(got, want)


def test_augment_preview_writes_a_grid_and_refuses_impossible_options(tmp_path):
    from PIL import Image

    spec = Path(__file__).resolve().parents[1] / "data_specs" / "pneumoniamnist.yaml"
    out = tmp_path / "grid.png"
    result = run_cli(
        "augment-preview", "--spec", str(spec), "--out", str(out), "--count", "3", "--versions", "2"
    )
    assert f"preview written to {out}" in result.stdout
    with Image.open(out) as grid:
        assert grid.format == "PNG" and grid.width > 300 and grid.height > 300
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        spec.read_text()
        .replace("\ndata:\n", "\naugmentation: {options: {hue: {probability: 1}}}\ndata:\n")
        .replace("../../shared", str(spec.parents[2] / "shared"))
    )
    result = run_cli(
        "augment-preview", "--spec", str(bad), "--out", str(tmp_path / "b.png"), expect=2
    )
    assert "augmentation option 'hue' needs image.channels: 3" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b.png").exists()


@pytest.fixture(scope="module")
def corpus_scores(pipeline, tmp_path_factory) -> dict[str, Path]:
    """The real DICOM corpus (MR, CT, US, radiographs...) scored by the demo's export, flagging
    out-of-scope files and, with --strict, refusing them."""
    corpus, root = SHARED_DATA / "dicom" / "corpus", tmp_path_factory.mktemp("corpus_scores")
    scored = {}
    for mode in ("flag", "strict"):
        scored[mode] = out = root / mode / "scores.csv"
        extra = ["--strict"] if mode == "strict" else []
        args = ["score", str(corpus), "--model", str(pipeline["export"]), "--out", str(out)]
        run_cli(*args, "--no-progress", *extra, expect=1 if extra else 0)
    return scored


def test_the_demo_model_flags_every_mr_and_ct_of_the_corpus_out_of_scope(pipeline, corpus_scores):
    """The chest-radiograph model gives MR images a finding probability near 1; scoring must say
    they are not what it was trained on. With --strict they are not predicted at all."""
    corpus = SHARED_DATA / "dicom" / "corpus"
    profile = json.loads((pipeline["export"] / "assets.extra" / "profile.json").read_text())
    assert profile["header"]["Modality"] == {"DX": profile["images"]}
    assert profile["header"]["BodyPartExamined"] == {"CHEST": profile["images"]}
    flagged, strict = (
        pd.read_csv(corpus_scores[mode], keep_default_na=False).set_index("path")
        for mode in ("flag", "strict")
    )
    modalities = {
        name: str(pydicom.dcmread(corpus / name, stop_before_pixels=True).get("Modality", ""))
        for name in flagged.index
    }
    cross_sectional = [name for name, m in modalities.items() if m in ("MR", "CT")]
    assert len(cross_sectional) >= 10
    for name in cross_sectional:
        row = flagged.loc[name]
        if row["status"] == "error":  # an undecodable file has no verdict
            continue
        expected = f"no: modality {modalities[name]} (trained on DX)"
        assert row["modality"] == modalities[name]
        assert row["in_scope"].startswith(expected), (name, row["in_scope"])
        assert row["prob_finding"] != ""  # flagged, still predicted
        assert strict.loc[name, "status"] == "error" and strict.loc[name, "prob_finding"] == ""
        assert strict.loc[name, "error"].startswith(f"out of scope: {expected[4:]}")
        assert strict.loc[name, "ood_score"] == ""  # refused by its header: never predicted
    for name, m in modalities.items():
        if m in ("DX", "CR") and flagged.loc[name, "status"] == "ok":
            assert "modality" not in flagged.loc[name, "in_scope"], name


def test_monitor_alarms_on_the_corpus_not_on_the_training_kind_of_image(pipeline, corpus_scores):
    """New images of the kind the model was trained on (another draw of the demo generator)
    raise no alarm; a batch of MR, CT and other images does, named by its label. The export
    carries the same reference as the run (validation probabilities included), so both give
    the same findings."""
    root, demo = pipeline["root"], pipeline["root"] / "fresh" / "scores.csv"
    fresh = generate_dicom_dataset(root / "fresh_data", n_patients=24, seed=6).parent / "dicom"
    run_cli("score", str(fresh), "--model", str(pipeline["export"]), "--out", str(demo))
    assert len(pd.read_csv(demo)) >= 40
    with np.load(pipeline["run"] / "ood_reference.npz") as reference:
        probabilities = reference["validation_probabilities"]
    stored = json.loads((pipeline["export"] / "assets.extra" / "ood_validation.json").read_text())
    np.testing.assert_allclose(stored["validation_probabilities"], probabilities, atol=1e-6)
    options = ["--min-files", "20"]
    calm = run_cli("monitor", str(demo), "--model", str(pipeline["export"]), "--out",
                   str(root / "calm"), *options)  # fmt: skip
    assert "no drift" in calm.stdout
    findings = pd.read_csv(root / "calm" / "monitor.csv", keep_default_na=False)
    checked = findings[findings["n"] > 0]["check"].tolist()  # checks that had data to check
    assert {"out_of_scope", "ood_score", "intensity_mean", "modality"} <= set(checked)
    assert "prevalence:finding" in checked
    batches = [str(demo), str(corpus_scores["flag"])]
    outputs = {}
    for model in ("export", "run"):
        outputs[model] = out = root / f"drift_{model}"
        args = ["monitor", *batches, "--model", str(pipeline[model]), "--out", str(out), *options]
        drifted = run_cli(*args, expect=1)
    alarms = json.loads((outputs["export"] / "monitor.json").read_text())["alarms"]
    assert alarms and all(alarm.startswith("flag/scores.csv: ") for alarm in alarms), alarms
    assert any(" out_of_scope " in alarm for alarm in alarms)
    assert any(" modality drifted" in alarm for alarm in alarms)
    assert "alarm: flag/scores.csv: out_of_scope" in drifted.stdout
    by_export, by_run = (pd.read_csv(outputs[m] / "monitor.csv") for m in ("export", "run"))
    pd.testing.assert_frame_equal(by_export, by_run, atol=1e-5)
    html = (outputs["export"] / "monitor.html").read_text()
    assert "flag/scores.csv" in html and "data:image/png;base64," in html


def test_run_and_export_give_the_same_ood_scores(pipeline, tmp_path):
    """The OOD score is computed in the exported graph (TF Serving users get it) and equals the
    run directory's; the export carries the validation scores its percentiles are read from."""
    run, export = pipeline["run"], pipeline["export"]
    with np.load(run / "ood_reference.npz") as reference:
        validation = reference["validation_scores"]
    assert len(validation) > 0 and np.all(np.diff(validation) >= 0)
    stored = json.loads((export / "assets.extra" / "ood_validation.json").read_text())
    np.testing.assert_allclose(stored["validation_scores"], validation, rtol=1e-5)
    card = json.loads((export / "model_card.json").read_text())
    assert "Mahalanobis" in card["outputs"]["ood_score"]
    folder = pipeline["data"] / "dicom"
    run_cli("score", str(folder), "--model", str(run), "--out", str(tmp_path / "r.csv"))
    by_run = pd.read_csv(tmp_path / "r.csv").set_index("path")
    by_export = pd.read_csv(pipeline["scores"]).set_index("path").loc[by_run.index]
    np.testing.assert_allclose(by_export["ood_score"], by_run["ood_score"], rtol=1e-3)
    np.testing.assert_allclose(by_export["prob_finding"], by_run["prob_finding"], atol=1e-5)
