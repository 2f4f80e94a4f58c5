"""Lean exports (LiteRT float32 / float16 / int8, ONNX): parity with the Keras model on real
images, the layout beside the graph, the thresholds' re-check, and the predictor contract
through which ``score`` and ``evaluate`` run them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medtransfer.errors import ExportError
from medtransfer.evaluation.thresholds import read_thresholds, write_thresholds
from medtransfer.export import version_dir
from medtransfer.export_layout import EXPORT_INFO, EXPORT_LEAN, is_export, lean_graph
from medtransfer.lean_export import (
    INT8_MIN_AGREEMENT,
    denylist_sizes,
    export_lean,
    recheck,
    validation_data,
)
from medtransfer.predictor import LiteRTPredictor, ModelInfo, OnnxPredictor, load_predictor
from medtransfer.rundir import MANIFEST_FILE, THRESHOLDS_FILE, open_run

from .conftest import SHARED_DATA

pytest.importorskip("onnxruntime")
pytest.importorskip("ai_edge_litert")

BREAST = SHARED_DATA / "medmnist" / "breastmnist.npz"
VARIANTS = {"onnx": ("onnx", "none"), "float16": ("litert", "float16"), "int8": ("litert", "int8")}


@pytest.fixture(scope="module")
def breast_run(tmp_path_factory) -> Path:
    """A real run on BreastMNIST (3 epochs, 32 px, MobileNetV3Small): its probabilities vary
    across images (``tiny_run``'s one epoch leaves them constant), and its validation split
    is real ultrasound images for int8 calibration."""
    from medtransfer.spec import spec_from_dict
    from medtransfer.training.run import train

    root = tmp_path_factory.mktemp("breast")
    config = {
        "name": "breast_tiny",
        "task": "binary",
        "classes": ["malignant", "normal_or_benign"],
        "positive_class": "malignant",
        "data": {"format": "npz", "path": str(BREAST)},
        "image": {"size": [32, 32], "channels": 1},
        "model": {"backbone": "mobilenetv3small", "weights": "none"},
        "training": {"epochs": 3, "batch_size": 32},
    }
    return train(spec_from_dict(config, base_dir=root), root / "run", workers=0).path


@pytest.fixture(scope="module")
def evaluated_run(breast_run, tmp_path_factory) -> Path:
    """A copy of ``breast_run`` with thresholds kept as evaluation keeps them (val split)."""
    run_dir = tmp_path_factory.mktemp("lean") / "run"
    shutil.copytree(breast_run, run_dir)
    record = {
        "chosen_on": "val",
        "rule": "probability >= threshold",
        "thresholds": {"malignant": {"youden": 0.5, "fixed_0.5": 0.5}},
        "temperature": None,
        "settings": {"fixed_threshold": 0.5},
    }
    open_run(run_dir).kept(THRESHOLDS_FILE).parent.mkdir(exist_ok=True)
    write_thresholds(open_run(run_dir).kept(THRESHOLDS_FILE), record)
    return run_dir


@pytest.fixture(scope="module")
def exports(evaluated_run, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("lean_models")
    return {
        name: export_lean(evaluated_run, out / name / "1", fmt=fmt, quantize=quantize)
        for name, (fmt, quantize) in VARIANTS.items()
    }


@pytest.fixture(scope="module")
def outlier_run(breast_run, tmp_path_factory) -> Path:
    """``breast_run`` with a small model in place of its own that full-integer int8 breaks: a
    dead feature (always 0) carries a weight 300 times the others' into the logits. It adds
    nothing in float, but the logits layer's per-channel int8 weights then step by 300 / 127
    of the largest other weight, every other weight rounds to 0 and all images get one
    decision. The validation images' scores span 4 logits and the decision threshold sits in
    their widest gap near the median: the decisions split and none is marginal."""
    import keras

    run_dir = tmp_path_factory.mktemp("outlier") / "run"
    shutil.copytree(breast_run, run_dir)
    run = open_run(run_dir)
    images, _ = validation_data(run, ModelInfo.from_run_info(run.info))
    image = keras.Input((32, 32, 1), name="image")
    features = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="features")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    probabilities = keras.layers.Dense(2, activation="softmax", name="probabilities")(pooled)
    model = keras.Model(image, probabilities, name="outlier")
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (3, 3, 1, 4)).astype(np.float32)
    kernel[..., 3] = 0  # feature 3: relu(0 - 1) = 0 on every image
    model.get_layer("features").set_weights([kernel, np.array([0, 0, 0, -1], np.float32)])
    w = np.append(rng.normal(0, 1, 3), 0)
    score = keras.Model(image, pooled).predict(images, verbose=0) @ w
    w, score = w * 4 / np.ptp(score), score * 4 / np.ptp(score)
    w[3] = 300 * np.abs(w).max()  # times feature 3: 0 in float
    middle = np.sort(score)[len(score) // 4 : 3 * len(score) // 4]
    gap = int(np.argmax(np.diff(middle)))
    threshold = middle[gap : gap + 2].mean()
    weights = [np.stack([w, -w], axis=1), np.array([-threshold, threshold])]
    model.get_layer("probabilities").set_weights([v.astype(np.float32) for v in weights])
    model.save(run.model_file)
    return run_dir


@pytest.fixture(scope="module")
def real_images() -> list[np.ndarray]:
    """BreastMNIST test images (real ultrasound, 28 px; the predictor resizes them to 32)."""
    with np.load(BREAST) as data:
        return [image.astype(np.float32) / 255.0 for image in data["test_images"]]


@pytest.fixture(scope="module")
def keras_probs(breast_run, real_images) -> np.ndarray:
    """The run's Keras model on the same images: the reference every lean graph is held to."""
    probabilities = load_predictor(breast_run).predict(real_images)
    assert probabilities[:, 0].std() > 1e-3  # not a constant model: parity means something
    return probabilities


def test_each_export_holds_one_graph_and_the_assets(exports):
    expected = {"onnx": "model.onnx", "float16": "model.tflite", "int8": "model.tflite"}
    for name, folder in exports.items():
        assert folder.name == "1" and is_export(folder)
        assert not (folder / "saved_model.pb").exists()
        assert lean_graph(folder) == (VARIANTS[name][0], folder / expected[name])
        assert json.loads((folder / EXPORT_INFO).read_text())["classes"] == [
            "malignant",
            "normal_or_benign",
        ]
        record = json.loads((folder / EXPORT_LEAN).read_text())
        assert (record["format"], record["quantize"]) == VARIANTS[name]
        assert record["bytes"] == (folder / expected[name]).stat().st_size
        card = json.loads((folder / "model_card.json").read_text())
        assert card["lean_export"]["graph"] == expected[name]
        assert "serving_default" not in card["input"]
        assert card["input"]["image"].startswith("image: float32 [batch, 32, 32, 1]")
        markdown = (folder / "model_card.md").read_text()
        assert "## Lean export" in markdown and "any H, W" not in markdown


def test_int8_is_smaller_than_float16_smaller_than_float32(exports):
    size = {name: lean_graph(folder)[1].stat().st_size for name, folder in exports.items()}
    assert size["int8"] < size["float16"] < size["onnx"]
    record = json.loads((exports["int8"] / EXPORT_LEAN).read_text())
    assert record["calibration_images"] == 78
    assert record["scheme"] == "int8" and record["tried"]["int8"] >= 0.98  # full integer kept
    assert record["denylisted"] == [] and record["int8_ops"] > 0.9


def test_an_int8_graph_litert_cannot_prepare_fails_the_check(evaluated_run, tmp_path, monkeypatch):
    """LiteRT refuses to prepare some int8 graphs (a requantisation scale beyond its kernels'
    range) with a RuntimeError when the predictor first runs them: that graph agrees on no
    image, and the next one is tried, instead of the export crashing."""
    from medtransfer import lean_export

    real = lean_export.load_predictor
    calls = []

    def unpreparable(images):
        raise RuntimeError("failed to create XNNPACK runtime")

    def first_graph_unpreparable(folder, *args, **kwargs):
        calls.append(folder)
        predictor = real(folder, *args, **kwargs)
        if len(calls) == 1:
            monkeypatch.setattr(predictor, "predict_batch", unpreparable)
        return predictor

    monkeypatch.setattr(lean_export, "load_predictor", first_graph_unpreparable)
    folder = export_lean(evaluated_run, tmp_path / "m" / "1", fmt="litert", quantize="int8")
    record = json.loads((folder / EXPORT_LEAN).read_text())
    assert record["tried"]["int8"] == 0.0
    assert record["scheme"] == "int8_selective" and len(calls) == 2


def test_int8_keeps_the_layers_int8_breaks_in_float_when_full_integer_fails(outlier_run, tmp_path):
    folder = export_lean(outlier_run, tmp_path / "m" / "1", fmt="litert", quantize="int8")
    record = json.loads((folder / EXPORT_LEAN).read_text())
    assert record["tried"]["int8"] < 0.9  # full integer: one decision for every image
    assert record["scheme"] == "int8_selective" and record["quantize"] == "int8"
    assert "int8_weights" not in record["tried"]  # the calibrated scheme passed first
    worst = record["denylisted"][0]  # the logits layer: far above rounding (about 0.29)
    assert worst["op"] == "FULLY_CONNECTED" and "probabilities" in worst["tensor"]
    assert worst["rmse_per_scale"] > 5
    kept = f"int8_selective:{len(record['denylisted'])}"
    assert list(record["tried"])[-1] == kept and record["tried"][kept] >= INT8_MIN_AGREEMENT
    assert record["recheck"]["decision_agreement"]["top_class"] >= INT8_MIN_AGREEMENT
    assert 0.5 <= record["int8_ops"] < 1  # the convolution and pooling stay int8
    assert record["calibration_images"] == 78
    assert json.loads((folder / "model_card.json").read_text())["lean_export"] == record
    share = f"{record['int8_ops']:.0%}"
    assert (
        f"(litert, int8 with {len(record['denylisted'])} layer(s) kept float32, {share} of "
        "operations int8," in (folder / "model_card.md").read_text()
    )


def test_int8_tries_double_the_float_layers_up_to_half():
    assert denylist_sizes(0) == []  # no ranking: no selective graph
    assert denylist_sizes(1) == denylist_sizes(3) == [1]
    assert denylist_sizes(8) == [1, 2, 4]
    assert denylist_sizes(316) == [1, 2, 4, 8, 16, 32, 64, 128]


@pytest.mark.parametrize("name", ["onnx", "float16"])
def test_onnx_and_float16_match_keras_on_real_images(exports, name, real_images, keras_probs):
    predictor = load_predictor(exports[name])
    assert isinstance(predictor, OnnxPredictor if name == "onnx" else LiteRTPredictor)
    probabilities, ood = predictor.predict_with_ood(real_images)
    assert ood is None  # lean graphs carry no OOD score
    assert probabilities.shape == (len(real_images), 2)
    assert np.abs(probabilities - keras_probs).max() <= 1e-3


def test_int8_decisions_agree_on_real_images(exports, real_images, keras_probs):
    probabilities = load_predictor(exports["int8"]).predict(real_images)
    agree = np.mean(np.argmax(probabilities, 1) == np.argmax(keras_probs, 1))
    assert agree >= 0.98
    assert np.abs(probabilities - keras_probs).max() < 0.1


def test_thresholds_travel_and_are_rechecked_on_validation(exports, evaluated_run):
    original = read_thresholds(open_run(evaluated_run).kept(THRESHOLDS_FILE))
    onnx = json.loads((exports["onnx"] / EXPORT_LEAN).read_text())["recheck"]
    assert onnx["split"] == "val" and onnx["images"] == 78
    assert onnx["max_abs_difference"] < 1e-5
    assert onnx["moved"] is False
    points = ["youden", "sensitivity_0.95", "specificity_0.95", "fixed_0.5"]
    agreement = onnx["decision_agreement"]
    assert set(agreement) == {"top_class", *[f"malignant:{point}" for point in points]}
    # a threshold is chosen at a validation image's probability: that one image may flip
    assert min(agreement.values()) >= 77 / 78 and agreement["top_class"] == 1.0
    shipped = read_thresholds(exports["onnx"] / "assets.extra" / THRESHOLDS_FILE)
    assert shipped == original  # unmoved: the evaluation's own record travels unchanged
    for name in ("float16", "int8"):
        record = json.loads((exports[name] / EXPORT_LEAN).read_text())["recheck"]
        shipped = read_thresholds(exports[name] / "assets.extra" / THRESHOLDS_FILE)
        expected = record["thresholds_lean"] if record["moved"] else original["thresholds"]
        assert shipped["thresholds"] == expected


def test_recheck_gives_the_lean_model_its_own_thresholds_when_they_move():
    info = ModelInfo("m", "binary", ["neg", "pos"], "pos", (8, 8), 1, "dicom", "first")
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], np.float32)
    p_keras = np.array([[0.9, 0.1], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]], np.float32)
    record = {"thresholds": {"pos": {"youden": 0.6}}, "settings": {}, "temperature": None}
    shipped, check = recheck(y, p_keras, p_keras.copy(), info, record)
    assert shipped is record and check["moved"] is False
    assert check["decision_agreement"]["top_class"] == 1.0
    p_lean = p_keras + np.array([[0, 0], [0, 0], [0.05, -0.05], [0, 0]], np.float32)
    shipped, check = recheck(y, p_keras, p_lean, info, record)
    assert check["moved"] is True
    assert check["thresholds_keras"]["pos"]["youden"] == pytest.approx(0.6)
    assert check["thresholds_lean"]["pos"]["youden"] == pytest.approx(0.55)
    assert shipped["thresholds"] == check["thresholds_lean"]
    assert check["max_abs_difference"] == pytest.approx(0.05)
    assert check["decision_agreement"]["pos:youden"] == 0.75  # 0.55 < 0.6: one flips


def test_recheck_without_evaluation_records_only_agreement():
    info = ModelInfo("m", "multiclass", ["a", "b", "c"], None, (8, 8), 1, "dicom", "first")
    p = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    lean = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]
    shipped, check = recheck(p, p, lean, info, None)
    assert shipped is None and check["decision_agreement"] == {"top_class": 0.75}
    assert "not evaluated" in check["thresholds"]


@pytest.mark.slow  # every int8 graph (~1 min); the int8 exports above run the check
def test_int8_falls_back_to_weights_only_then_refuses_when_decisions_change(
    breast_run, tmp_path, monkeypatch
):
    import medtransfer.lean_export as lean_export

    monkeypatch.setattr(lean_export, "INT8_MIN_AGREEMENT", 1.01)  # no scheme can pass
    tried = r"\(int8\), .*\(int8_selective:1\), .*\(int8_weights\) of the validation"
    with pytest.raises(ExportError, match=tried):
        export_lean(breast_run, tmp_path / "m" / "1", fmt="litert", quantize="int8")
    assert not (tmp_path / "m" / "1").exists()


def test_int8_is_refused_when_the_run_cannot_give_validation_images(breast_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(breast_run, run_dir)
    manifest = pd.read_csv(run_dir / MANIFEST_FILE, keep_default_na=False)
    manifest[manifest["split"] != "val"].to_csv(run_dir / MANIFEST_FILE, index=False)
    with pytest.raises(ExportError, match="int8 quantisation is calibrated on the run's valid"):
        export_lean(run_dir, tmp_path / "m" / "1", fmt="litert", quantize="int8")
    assert not (tmp_path / "m" / "1").exists()


@pytest.mark.parametrize(
    ("fmt", "quantize", "message"),
    [
        ("onnx", "int8", "applies to --format litert only"),
        ("tflite", "none", "unknown export format"),
        ("litert", "int4", "unknown quantisation"),
    ],
)
def test_bad_choices_are_refused_before_any_work(breast_run, tmp_path, fmt, quantize, message):
    with pytest.raises(ExportError, match=message):
        export_lean(breast_run, tmp_path / "m" / "1", fmt=fmt, quantize=quantize)
    assert not (tmp_path / "m").exists()


def test_versions_are_immutable_and_a_bare_graph_folder_is_refused(
    exports, evaluated_run, tmp_path
):
    with pytest.raises(ExportError, match="versions are immutable"):
        export_lean(evaluated_run, exports["onnx"], fmt="onnx")
    bare = tmp_path / "name"
    bare.mkdir()
    (bare / "model.tflite").write_bytes(b"x")
    with pytest.raises(ExportError, match="holds an exported model directly"):
        version_dir(bare)
    assert version_dir(exports["int8"].parent) == exports["int8"].parent / "2"


def test_the_graph_file_itself_loads_as_the_model(exports, real_images):
    folder = exports["float16"]
    by_file = load_predictor(folder / "model.tflite").predict(real_images[:5])
    np.testing.assert_array_equal(by_file, load_predictor(folder).predict(real_images[:5]))


def test_cli_scores_a_folder_with_a_lean_export(exports, breast_run, real_images, tmp_path):
    from PIL import Image

    from medtransfer.cli import main

    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, image in enumerate(real_images[:12]):  # 8-bit PNGs hold the npz pixels exactly
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(folder / f"{i:02d}.png")
    out = tmp_path / "scores.csv"
    assert main(["score", str(folder), "--model", str(exports["int8"]), "--out", str(out)]) == 0
    scores = pd.read_csv(out, keep_default_na=False).sort_values("path")
    assert len(scores) == 12 and set(scores["status"]) == {"ok"}
    assert set(scores["ood_score"]) == {""}  # no OOD score from a lean graph
    expected = load_predictor(exports["int8"]).predict(real_images[:12])[:, 0]
    np.testing.assert_allclose(scores["prob_malignant"].to_numpy(), expected, atol=1e-6)


def test_cli_refuses_quantized_saved_models_and_lean_tta(breast_run, tmp_path, capsys):
    from medtransfer.cli import main

    out = str(tmp_path / "m" / "1")
    assert main(["export", str(breast_run), "--out", out, "--quantize", "int8"]) == 2
    assert "applies to --format litert only" in capsys.readouterr().err
    assert main(["export", str(breast_run), "--out", out, "--format", "onnx", "--tta"]) == 2
    assert "--tta is built into SavedModel exports only" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_evaluate_runs_a_lean_export_through_the_predictor(exports, breast_run):
    from medtransfer.evaluation.assessment import compute_assessment
    from medtransfer.spec import load_spec

    spec = load_spec(open_run(breast_run).spec_file)
    kwargs = {"split": "test", "workers": 0, "settings": None, "tta": False}
    lean = compute_assessment(exports["float16"], spec, **kwargs)
    keras = compute_assessment(breast_run, spec, **kwargs)
    assert lean.metrics["n_images"] == keras.metrics["n_images"] == 156
    difference = lean.predictions["prob_malignant"] - keras.predictions["prob_malignant"]
    # the float16 graph ran (its probabilities are not the Keras model's), within parity; the
    # AUROCs are not compared: this 3-epoch model is near chance, where 1e-3 reorders images
    assert 0 < np.abs(difference).max() <= 1e-3
    assert lean.metrics["auroc"]["macro"] == pytest.approx(
        roc_auc_score(lean.predictions["y_malignant"], lean.predictions["prob_malignant"])
    )
    assert "gradcam" not in lean.figures


@pytest.mark.slow
def test_breastmnist_densenet_int8_agrees_on_98_percent_of_test_images(tmp_path, real_images):
    """The trained BreastMNIST run (DenseNet121, 64 px): the issue's parity targets."""
    run = Path(__file__).resolve().parents[1] / "benchmarks" / "out" / "ood_breast"
    if not (run / MANIFEST_FILE).is_file():
        pytest.skip("benchmarks/out/ood_breast is not there (benchmarks/ood_detection.py)")
    keras = load_predictor(run).predict(real_images)
    for name, (fmt, quantize) in VARIANTS.items():
        folder = export_lean(run, tmp_path / name / "1", fmt=fmt, quantize=quantize)
        probabilities = load_predictor(folder).predict(real_images)
        difference = np.abs(probabilities - keras).max()
        if name == "int8":
            agree = np.mean(np.argmax(probabilities, 1) == np.argmax(keras, 1))
            assert agree >= 0.98, f"int8 decisions agree on {agree:.1%}"
        elif name == "float16":
            # the issue's 1e-3 is NOT met here: float16 weights over DenseNet121's 120 layers
            # differ by 1.76e-3 at most on these 156 images (MobileNetV3Small meets 1e-3 above).
            # It is the rounding itself: the converter's float16 mode turns every float
            # constant to float16 (no option keeps some float32), and rounding the weights in
            # Keras (float32 arithmetic) already moves a DenseNet121 run by 1.3e-3
            assert difference <= 2.5e-3, f"float16 differs by {difference:.2g}"
        else:
            assert difference <= 1e-3, f"onnx differs by {difference:.2g}"
