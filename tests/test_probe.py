"""``medtransfer probe``: a logistic regression on frozen features, reported with the clinical
report of ``evaluate``, on real PneumoniaMNIST images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from medtransfer.cli import main
from medtransfer.evaluation.probe import PROBE_C, _encode
from medtransfer.spec import TabularFeature


@pytest.fixture(scope="module")
def pneumonia_spec(shared_data, tmp_path_factory):
    """A stratified-enough subset of the real archive (written to a temporary folder): 300
    training, 100 validation and 200 test images."""
    root = tmp_path_factory.mktemp("probe")
    sizes = {"train": 300, "val": 100, "test": 200}
    rng = np.random.default_rng(0)
    arrays = {}
    with np.load(shared_data / "medmnist" / "pneumoniamnist.npz") as archive:
        for split, n in sizes.items():
            keep = np.sort(rng.choice(len(archive[f"{split}_labels"]), n, replace=False))
            arrays[f"{split}_images"] = archive[f"{split}_images"][keep]
            arrays[f"{split}_labels"] = archive[f"{split}_labels"][keep]
    np.savez(root / "pneumonia.npz", **arrays)
    spec = {
        "name": "pneumonia-probe",
        "task": "binary",
        "classes": ["normal", "pneumonia"],
        "modality": "xray",
        "data": {"format": "npz", "path": "pneumonia.npz"},
        "image": {"size": [32, 32], "channels": 1},
        "model": {"backbone": "mobilenetv3small", "weights": "none"},
        "training": {"batch_size": 100},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return root / "spec.yaml"


def test_a_probe_on_random_features_reports_like_evaluate_and_beats_chance(
    pneumonia_spec, tmp_path, capsys
):
    out = tmp_path / "probe"
    args = ["probe", "--spec", str(pneumonia_spec), "--weights", "none", "--out", str(out)]
    assert main([*args, "--bootstrap", "100", "--workers", "0"]) == 0
    assert "linear probe on 576 features" in capsys.readouterr().out
    for name in ("metrics.json", "predictions.csv", "thresholds.json", "report.html", "roc.png"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["n_images"] == 200
    assert metrics["auroc"]["macro"] > 0.7  # chance is 0.5; random conv features carry shape
    model = metrics["provenance"]["model"]
    assert model["kind"] == "linear probe" and model["weights"] == "none"
    assert model["C"] in PROBE_C and set(model["val_auroc_by_C"]) == {str(c) for c in PROBE_C}
    assert metrics["threshold_selection"]["n_images"] == 100  # chosen on val, as evaluate does
    assert "youden" in metrics["operating_points"]["pneumonia"]
    assert "linear probe <b>probe</b>" in (out / "report.html").read_text()


def test_tabular_features_are_fused_as_the_model_encodes_them():
    age = TabularFeature(name="age", type="numeric")
    view = TabularFeature(name="view", type="categorical", values=["PA", "AP"])
    np.testing.assert_array_equal(
        _encode(np.array([[50.0], [np.nan], [70.0]]), age, {"age": (60.0, 10.0)}),
        [[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]],
    )
    np.testing.assert_array_equal(
        _encode(np.array([["AP"], [""], ["LL"]]), view, {}),
        [[0, 1, 0], [0, 0, 1], [0, 0, 1]],
    )
