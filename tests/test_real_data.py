"""Short training runs on the real MedMNIST files through the shipped specs: the spec, the npz
loader, multiclass/colour handling and the evaluation report all meet real data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtransfer.evaluation.report import evaluate
from medtransfer.spec import load_spec
from medtransfer.training.run import train

from .conftest import REPO

CLI = Path(sys.executable).parent / "medtransfer"
FAST = {"backbone": "mobilenetv3small"}


@pytest.mark.slow  # ~45 s; the CLI path is covered on DICOM data by test_cli.py
def test_breastmnist_cli_train_then_evaluate_on_the_test_split(tmp_path):
    spec = REPO / "data_specs" / "breastmnist.yaml"
    common = {"capture_output": True, "text": True, "timeout": 600}
    train_cmd = [
        str(CLI),
        "train",
        "--spec",
        str(spec),
        "--out",
        str(tmp_path / "run"),
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--backbone",
        "mobilenetv3small",
    ]
    result = subprocess.run(train_cmd, **common)
    assert result.returncode == 0, result.stderr
    eval_cmd = [
        str(CLI),
        "evaluate",
        str(tmp_path / "run"),
        "--spec",
        str(spec),
        "--split",
        "test",
        "--out",
        str(tmp_path / "report"),
    ]
    result = subprocess.run(eval_cmd, **common)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["n_images"] == 156
    assert metrics["prevalence"]["malignant"] == pytest.approx(42 / 156, abs=1e-7)
    assert metrics["positive_class"] == "malignant"
    assert "AUROC malignant" in result.stdout
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["images"] == {"train": 546, "val": 78, "test": 156}


@pytest.mark.slow  # ~30 s; colour and multiclass paths are also covered by faster tests
def test_retinamnist_multiclass_colour_run(tmp_path):
    spec = load_spec(REPO / "data_specs" / "retinamnist.yaml").with_overrides(
        model=FAST, training={"epochs": 1}, image={"size": (32, 32)}
    )
    run = train(spec, tmp_path / "run")
    result = evaluate(run.path, spec, split="test", out_dir=tmp_path / "report")
    per_class = result.metrics["auroc"]["per_class"]
    assert list(per_class) == [f"grade_{i}" for i in range(5)]
    assert result.metrics["auroc"]["macro"] == pytest.approx(np.mean(list(per_class.values())))
    predictions = pd.read_csv(tmp_path / "report" / "predictions.csv")
    probs = predictions[[f"prob_grade_{i}" for i in range(5)]].to_numpy()
    np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
    assert len(predictions) == 400
