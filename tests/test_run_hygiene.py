"""Runs, reports and exports that cannot mislead their reader.

Strict JSON (no bare ``Infinity``/``NaN``) in every file another program parses, a degenerate
model (the same prediction for every image) flagged wherever it appears, exports laid out as
TF Serving's ``NAME/VERSION``, and a train that fails before its first checkpoint leaving
nothing in the way of the rerun.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from medtransfer.errors import DegenerateModelWarning, ExportError, RunError
from medtransfer.evaluation.thresholds import read_thresholds
from medtransfer.export import EXPORT_THRESHOLDS, export_model, version_dir
from medtransfer.rundir import MODEL_FILE, RUN_FILE, SPEC_FILE
from medtransfer.spec import load_spec, spec_from_dict
from medtransfer.training.run import train

from .conftest import tiny_config


def strict_json(path: Path) -> dict:
    """Parse as JavaScript's JSON.parse would: ``Infinity`` and ``NaN`` are errors."""

    def reject(constant: str) -> None:
        raise ValueError(f"{path.name} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


@pytest.fixture(scope="module")
def constant_run(tiny_run: Path, tmp_path_factory) -> Path:
    """tiny_run with its output layer's kernel zeroed: every image gets sigmoid(bias)."""
    run = tmp_path_factory.mktemp("constant") / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "evaluation", ignore_errors=True)
    model = keras.saving.load_model(run / MODEL_FILE)
    head = next(layer for layer in reversed(model.layers) if hasattr(layer, "kernel"))
    head.kernel.assign(np.zeros(head.kernel.shape, dtype="float32"))
    model.save(run / MODEL_FILE)
    return run


@pytest.fixture(scope="module")
def constant_report(constant_run: Path, tmp_path_factory) -> tuple[Path, list]:
    from medtransfer.evaluation.report import evaluate

    out = tmp_path_factory.mktemp("constant_report")
    spec = load_spec(constant_run / SPEC_FILE)
    with pytest.warns(DegenerateModelWarning, match="degenerate model") as caught:
        evaluate(constant_run, spec, split="test", out_dir=out)
    return out, [w for w in caught if w.category is DegenerateModelWarning]


def test_evaluating_a_constant_model_warns_and_says_so_in_every_file(constant_report) -> None:
    out, warned = constant_report
    assert len(warned) == 1
    metrics = strict_json(out / "metrics.json")
    assert metrics["degenerate_model"]["splits"] == {"test": ["spot"], "val": ["spot"]}
    assert metrics["auroc"]["macro"] == 0.5
    html = (out / "report.html").read_text()
    assert "role='alert'" in html and "degenerate model" in html
    assert html.index("role='alert'") < html.index("<table")  # above every figure


def test_infinite_thresholds_are_null_with_a_reason_and_read_back_as_infinity(
    constant_report, constant_run: Path
) -> None:
    out, _ = constant_report
    for path in (out / "thresholds.json", constant_run / "evaluation" / "thresholds.json"):
        written = strict_json(path)
        assert written["thresholds"]["spot"]["youden"] is None
        assert "null stands for +infinity" in written["threshold_notes"]["spot"]["youden"]
        assert read_thresholds(path)["thresholds"]["spot"]["youden"] == math.inf
    point = strict_json(out / "metrics.json")["operating_points"]["spot"]["youden"]
    assert "null stands for +infinity" in point["threshold_note"]


@pytest.mark.parametrize(
    "content", ['{"thresholds": {"spot": {"youden": 0.4', '{"rule": "p >= t"}', "[1, 2]"]
)
def test_a_damaged_thresholds_file_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "thresholds.json"
    path.write_text(content)
    with pytest.raises(RunError, match=r"thresholds.json is not a thresholds file .*evaluate"):
        read_thresholds(path)


def test_export_of_a_constant_model_warns_and_writes_valid_json(
    constant_report, constant_run: Path, tmp_path: Path
) -> None:
    with pytest.warns(DegenerateModelWarning, match="degenerate model"):
        exported = export_model(constant_run, tmp_path / "constant")
    assert exported == tmp_path / "constant" / "1"  # NAME given: its first version
    card = strict_json(exported / "model_card.json")
    assert any("in the evaluation (test split)" in found for found in card["degenerate_model"])
    assert card["decision_thresholds"]["thresholds"]["spot"]["youden"] is None
    assert (exported / "model_card.md").read_text().count("> **Warning**") >= 1
    assert "youden none (no image called positive)" in (exported / "model_card.md").read_text()
    assert strict_json(exported / EXPORT_THRESHOLDS)["thresholds"]["spot"]["youden"] is None


def test_export_folders_are_name_and_numeric_version(tmp_path: Path) -> None:
    name = tmp_path / "chest"
    assert version_dir(name) == name / "1"  # nothing there yet
    for folder in ("1", "3", "draft", "10x"):
        (name / folder).mkdir(parents=True)
    assert version_dir(name) == name / "4"
    assert version_dir(name / "7") == name / "7"
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ExportError, match="TF Serving cannot load"):
        version_dir(flat)


def identical_images(root: Path) -> Path:
    """Two classes whose images are all the same: no model can tell them apart."""
    image = Image.fromarray(np.full((32, 32), 120, dtype=np.uint8))
    for split, n in (("train", 8), ("val", 4), ("test", 4)):
        for label in ("plain", "spot"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                image.save(folder / f"{i}.png")
    return root


def test_a_train_failing_before_its_first_checkpoint_leaves_nothing_behind(
    tmp_path: Path,
) -> None:
    data = identical_images(tmp_path / "data")
    (tmp_path / "broken.weights.h5").write_bytes(b"not an HDF5 file")
    config = tiny_config(data, name="same")
    config["model"]["weights"] = "broken.weights.h5"
    broken = spec_from_dict(config, base_dir=tmp_path)
    out = tmp_path / "runs" / "same"
    with pytest.raises(Exception):  # noqa: B017 (whatever Keras raises for a bad weights file)
        train(broken, out, workers=0)
    assert not (tmp_path / "runs").exists()  # the parents it made went too
    out.mkdir(parents=True)
    (out.parent / "kept.txt").write_text("not ours")
    with pytest.raises(Exception):  # noqa: B017
        train(broken, out, workers=0)
    assert out.is_dir() and not any(out.iterdir())  # it existed before: only emptied
    assert (out.parent / "kept.txt").read_text() == "not ours"

    config["model"]["weights"] = "none"
    with pytest.warns(DegenerateModelWarning, match=r"val split: spot"):
        run = train(spec_from_dict(config, base_dir=tmp_path), out, workers=0)
    recorded = strict_json(out / RUN_FILE)["degenerate_model"]
    assert recorded["splits"] == {"val": ["spot"]}
    assert run.info.degenerate_model == recorded


def test_cli_export_to_a_name_adds_versions_and_warns_in_one_line(
    constant_report, constant_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from medtransfer import cli

    for version in ("1", "2"):
        assert cli.main(["export", str(constant_run), "--out", str(tmp_path / "cxr")]) == 0
        out, err = capsys.readouterr()
        assert f"SavedModel written to {tmp_path / 'cxr' / version} " in out
        warnings = [line for line in err.splitlines() if "warning" in line]
        assert warnings and all(
            line.startswith("medtransfer export: warning: export ") for line in warnings
        )
        assert ".py:" not in err  # not Python's file:line form
    assert sorted(p.name for p in (tmp_path / "cxr").iterdir()) == ["1", "2"]
