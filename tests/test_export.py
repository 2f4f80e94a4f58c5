"""The SavedModel contract: loads with TensorFlow alone, both signatures agree with the Keras
model, TF Serving's REST body works, and versions are written once and atomically."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from medtransfer.errors import ExportError
from medtransfer.export import export_model
from medtransfer.models.saved import load_run_model

from .conftest import SHARED_TOOLS

RNG = np.random.default_rng(1)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    return export_model(tiny_run, tmp_path_factory.mktemp("models") / "tiny" / "1")


def test_layout_and_model_card(exported):
    assert (exported / "saved_model.pb").is_file()
    assert (exported / "variables").is_dir()
    card = json.loads((exported / "model_card.json").read_text())
    assert card["classes"] == ["plain", "spot"]
    assert card["input"]["resized_inside_to"] == [32, 32]
    assert "# Model card: tiny" in (exported / "model_card.md").read_text()
    info = json.loads((exported / "assets.extra" / "medtransfer.json").read_text())
    assert info["image"] == {"size": [32, 32], "channels": 1, "window": "dicom", "frames": "first"}


def test_shared_contract_checker_passes(exported):
    result = subprocess.run(
        [sys.executable, str(SHARED_TOOLS / "check_export.py"), str(exported)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "export ok" in result.stdout


TF_ONLY = """
import sys
sys.modules["medtransfer"] = None
sys.modules["keras"] = None
import numpy as np, tensorflow as tf
m = tf.saved_model.load(sys.argv[1])
x = np.load(sys.argv[2])
out = m.signatures["serving_default"](image=tf.constant(x))
np.save(sys.argv[3], out["probabilities"].numpy())
print([n.decode() for n in out["class_names"].numpy()[0]])
"""


def test_serving_default_matches_keras_in_a_tensorflow_only_process(exported, tiny_run, tmp_path):
    x = RNG.random((4, 45, 38, 1), dtype=np.float32)  # not the model's size: resized inside
    np.save(tmp_path / "x.npy", x)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            TF_ONLY,
            str(exported),
            str(tmp_path / "x.npy"),
            str(tmp_path / "p.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "['plain', 'spot']" in result.stdout
    served = np.load(tmp_path / "p.npy")
    expected = np.asarray(load_run_model(tiny_run)(x, training=False))
    assert served.shape == (4, 2)
    assert np.max(np.abs(served - expected)) <= 1e-5


def png_bytes(image: np.ndarray) -> bytes:
    return tf.io.encode_png(tf.constant(image)).numpy()


def test_png_signature_matches_keras_on_the_same_quantised_pixels(exported, tiny_run):
    model = load_run_model(tiny_run)
    serve = tf.saved_model.load(str(exported)).signatures["predict_png"]
    images8 = [RNG.integers(0, 256, (32, 32, 1), dtype=np.uint8) for _ in range(3)]
    images16 = [RNG.integers(0, 65536, (32, 32, 1), dtype=np.uint16) for _ in range(2)]
    got = serve(image_bytes=tf.constant([png_bytes(i) for i in images8 + images16]))
    floats = [i / 255.0 for i in images8] + [i / 65535.0 for i in images16]
    expected = np.asarray(model(np.stack(floats).astype(np.float32), training=False))
    assert np.max(np.abs(got["probabilities"].numpy() - expected)) <= 1e-5


def test_png_batch_may_mix_sizes_and_colour(exported, tiny_run):
    serve = tf.saved_model.load(str(exported)).signatures["predict_png"]
    grey = RNG.integers(0, 256, (50, 70, 1), dtype=np.uint8)
    rgb = np.repeat(grey, 3, axis=-1)
    out = serve(image_bytes=tf.constant([png_bytes(grey), png_bytes(rgb)]))["probabilities"].numpy()
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out[0], out[1], atol=1e-5)  # RGB of grey == grey


def test_tf_serving_rest_body_goes_through_the_png_signature(exported, tiny_run):
    image = RNG.integers(0, 256, (32, 32, 1), dtype=np.uint8)
    body = json.dumps(
        {
            "signature_name": "predict_png",
            "instances": [{"image_bytes": {"b64": base64.b64encode(png_bytes(image)).decode()}}],
        }
    )
    request = json.loads(body)  # what TF Serving's REST handler does with the body
    signature = tf.saved_model.load(str(exported)).signatures[request["signature_name"]]
    raw = [base64.b64decode(inst["image_bytes"]["b64"]) for inst in request["instances"]]
    served = signature(image_bytes=tf.constant(raw))["probabilities"].numpy()
    model = load_run_model(tiny_run)
    expected = np.asarray(model((image / 255.0).astype(np.float32)[None], training=False))
    assert np.max(np.abs(served - expected)) <= 1e-5


def test_saved_model_cli_lists_both_signatures(exported):
    cli = Path(sys.executable).parent / "saved_model_cli"
    result = subprocess.run(
        [str(cli), "show", "--dir", str(exported), "--all"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for text in (
        "signature_def['serving_default']",
        "signature_def['predict_png']",
        "inputs['image']",
        "inputs['image_bytes']",
        "outputs['probabilities']",
    ):
        assert text in result.stdout


def test_versions_are_immutable(exported, tiny_run):
    with pytest.raises(ExportError, match="versions are immutable"):
        export_model(tiny_run, exported)
    assert (exported / "saved_model.pb").is_file()
    assert not [p for p in exported.parent.iterdir() if p.name.startswith(".")]


def test_model_card_summarises_the_data_per_split_and_site(exported):
    card = json.loads((exported / "model_card.json").read_text())
    half = {"plain": 0.5, "spot": 0.5}
    by_split = card["data_summary"]["by_split"]
    assert [(r["split"], r["images"], r["prevalence"]) for r in by_split] == [
        ("train", 24, half),
        ("val", 12, half),
        ("test", 12, half),
        ("all", 48, half),
    ]
    assert [r["patients"] for r in by_split] == [24, 12, 12, 48]  # folders: one image each
    assert card["modality"] == "other"
    assert card["training"]["images_per_split"] == {"train": 24, "val": 12, "test": 12}
    markdown = (exported / "model_card.md").read_text()
    assert "| Split | Images | Patients | plain (%) | spot (%) |" in markdown
    assert "| train | 24 | 24 | 50.0 | 50.0 |\n| val | 12 | 12 | 50.0 | 50.0 |" in markdown
    assert "| all | 48 | 48 | 50.0 | 50.0 |" in markdown
    assert "| (not recorded) | 48 | 48 | 50.0 | 50.0 |" in markdown  # folders record no site
    assert "{'train'" not in markdown and "Images per split: train 24, val 12, test 12" in markdown


def test_model_card_intended_use_comes_from_the_run(exported):
    card = json.loads((exported / "model_card.json").read_text())
    assert card["intended_use"].startswith(
        "Research and clinical-evaluation use: telling spot (the positive class) from plain "
        "on medical images like the training data described below. Every image is resized to "
        "32x32 pixels inside the model"
    )
    markdown = (exported / "model_card.md").read_text()
    assert "## Intended use\n" + card["intended_use"] in markdown
    assert "- Task: binary; classes: plain, spot; positive class: spot" in markdown


def test_model_card_holds_no_paths_or_patient_keys(exported, tiny_run):
    from medtransfer.rundir import open_run

    manifest = open_run(tiny_run).manifest()
    for name in ("model_card.md", "model_card.json"):
        text = (exported / name).read_text()
        assert str(tiny_run.parent) not in text
        assert not any(patient in text for patient in manifest["patient"].astype(str))


def test_data_summary_counts_patients_and_prevalence_per_site():
    from medtransfer.export import data_summary

    manifest = pd.DataFrame(
        {
            "path": [f"/data/{i}.png" for i in range(7)],
            "split": ["test", "train", "train", "train", "val", "train", "test"],
            "patient": ["p5", "p1", "p1", "p2", "p3", "p4", "p5"],
            "site": ["b", "a", "a", "a", "b", "", "b"],
            "label": ["yes", "no", "yes", "no", "yes", "no", "no"],
        }
    )
    summary = data_summary(manifest, ["no", "yes"], "binary")
    assert summary["by_split"] == [
        {"split": "train", "images": 4, "patients": 3, "prevalence": {"no": 0.75, "yes": 0.25}},
        {"split": "val", "images": 1, "patients": 1, "prevalence": {"no": 0.0, "yes": 1.0}},
        {"split": "test", "images": 2, "patients": 1, "prevalence": {"no": 0.5, "yes": 0.5}},
        {"split": "all", "images": 7, "patients": 5, "prevalence": {"no": 0.5714, "yes": 0.4286}},
    ]
    assert summary["by_site"] == [
        {
            "site": "(not recorded)",
            "images": 1,
            "patients": 1,
            "prevalence": {"no": 1.0, "yes": 0.0},
        },
        {"site": "a", "images": 3, "patients": 2, "prevalence": {"no": 0.6667, "yes": 0.3333}},
        {"site": "b", "images": 3, "patients": 2, "prevalence": {"no": 0.3333, "yes": 0.6667}},
    ]
    multilabel = manifest.assign(label=["x|y", "x", "", "y", "x;y", "y", "x"])
    rows = data_summary(multilabel, ["x", "y"], "multilabel")["by_split"]
    assert rows[0]["prevalence"] == {"x": 0.25, "y": 0.5}


def test_model_card_markdown_rounds_metrics_and_names_thresholds(tiny_run):
    from medtransfer.export import model_card
    from medtransfer.predictor import ModelInfo
    from medtransfer.rundir import open_run

    run = open_run(tiny_run)
    metrics = {
        "split": "test",
        "n_images": 12,
        "n_patients": 12,
        "accuracy": 0.8333333333,
        "balanced_accuracy": 0.8333333333,
        "auroc": {"macro": 0.9166666667},
        "discrimination": {
            "spot": {
                "auroc": 0.9166666667,
                "auroc_ci_delong": [0.7512345, 1.0],
                "auprc": 0.90123,
                "n_positive": 6,
                "n_negative": 6,
            }
        },
        "operating_points": {
            "spot": {
                "youden": {
                    "sensitivity": 0.8333333,
                    "sensitivity_ci": [0.4365, 0.9699],
                    "specificity": 1.0,
                    "specificity_ci": [0.6097, 1.0],
                }
            }
        },
    }
    thresholds = {
        "chosen_on": "val",
        "rule": "probability >= threshold",
        "thresholds": {"spot": {"youden": 0.41234567, "sensitivity_0.95": 0.2, "fixed_0.5": 0.5}},
    }
    markdown, card = model_card(ModelInfo.from_run_info(run.info), run.info, metrics, thresholds)
    assert "Accuracy 0.833, balanced accuracy 0.833, macro AUROC 0.917." in markdown
    assert "| spot | 0.917 (95% CI 0.751-1.000) | 0.901 | 6 | 6 |" in markdown
    assert (
        "- Best balance of sensitivity and specificity (Youden's J): youden 0.4123; "
        "sensitivity 0.833 (95% CI 0.436-0.970), specificity 1.000 (95% CI 0.610-1.000)"
    ) in markdown
    assert "- Sensitivity at least 95% on validation: sensitivity_0.95 0.2000\n" in markdown
    assert "- Fixed cut-off at probability 0.5: fixed_0.5 0.5000\n" in markdown
    assert card["evaluation"] == metrics and card["data_summary"] is None
