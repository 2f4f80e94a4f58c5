"""The SavedModel contract: loads with TensorFlow alone, both signatures agree with the Keras
model, TF Serving's REST body works, and versions are written once and atomically."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
