"""The run directory as a self-contained artefact: it opens wherever it is copied, from any
version, and nothing that reads it needs the training data."""

from __future__ import annotations

import json
import os
import shutil
import threading

import numpy as np
import pytest
import tensorflow as tf
import yaml

from medtransfer.cli import main
from medtransfer.errors import RunError, SpecError
from medtransfer.predictor import load_predictor
from medtransfer.rundir import RUN_FILE, SPEC_FILE, ImagePolicy, RunInfo, open_run
from medtransfer.spec import load_spec

IMAGES = np.random.default_rng(3).random((3, 40, 30, 1), dtype=np.float32)


def _moved_without_data(run, tmp_path, **spec_changes):
    """A copy of ``run`` whose spec names training data that does not exist (a run handed to
    another machine), with ``spec_changes`` applied to its stored spec."""
    copy = tmp_path / "moved"
    shutil.copytree(run, copy)
    raw = yaml.safe_load((copy / SPEC_FILE).read_text())
    raw["data"]["path"] = str(tmp_path / "gone")
    (copy / SPEC_FILE).write_text(yaml.safe_dump({**raw, **spec_changes}, sort_keys=False))
    with pytest.raises(SpecError, match="not found"):  # the stored spec no longer validates
        load_spec(copy / SPEC_FILE)
    return copy


def test_export_tta_works_on_a_copied_run_whose_training_data_is_gone(tiny_run, tmp_path):
    copy = _moved_without_data(tiny_run, tmp_path)
    assert main(["export", str(copy), "--out", str(tmp_path / "served" / "1"), "--tta"]) == 0
    served = tf.saved_model.load(str(tmp_path / "served" / "1")).signatures["serving_default"]
    here = load_predictor(copy, tta=True)  # the same model, through the Python API
    expected = load_predictor(tiny_run, tta=True).predict(list(IMAGES))
    np.testing.assert_allclose(here.predict(list(IMAGES)), expected, atol=1e-6)
    probabilities = served(image=tf.constant(IMAGES))["probabilities"].numpy()
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    card = (tmp_path / "served" / "1" / "model_card.md").read_text()
    assert "identity, central 90% zoom, and both mirrored" in card  # modality "other"


def test_a_run_from_an_earlier_version_opens_with_its_modality_from_the_stored_spec(
    tiny_run, tmp_path
):
    copy = _moved_without_data(tiny_run, tmp_path, modality="xray")
    record = json.loads((copy / RUN_FILE).read_text())
    del record["modality"]  # runs before the typed RunInfo did not record it
    (copy / RUN_FILE).write_text(json.dumps(record))
    assert open_run(copy).info.modality == "xray"
    target = tmp_path / "served" / "1"
    assert main(["export", str(copy), "--out", str(target), "--tta"]) == 0
    assert "not mirrored: radiograph" in (target / "model_card.md").read_text()


def test_run_info_round_trips_and_keeps_what_a_later_version_added(tiny_run):
    record = json.loads((tiny_run / RUN_FILE).read_text())
    info = RunInfo.from_json({**record, "reviewed_by": {"name": "QA", "on": "2026-12-01"}})
    assert info.extra == {"reviewed_by": {"name": "QA", "on": "2026-12-01"}}
    assert info.to_json() == {**record, "reviewed_by": {"name": "QA", "on": "2026-12-01"}}
    assert info.image == ImagePolicy((32, 32), 1, "dicom", "first")
    assert (info.classes, info.task, info.positive_class) == (["plain", "spot"], "binary", "spot")
    assert info.modality == "other" and info.seed == 0 and len(info.data_fingerprint) > 8


def test_a_damaged_run_record_is_one_error_naming_the_file(tiny_run, tmp_path):
    copy = tmp_path / "damaged"
    shutil.copytree(tiny_run, copy)
    text = (copy / RUN_FILE).read_text()
    (copy / RUN_FILE).write_text(text[: len(text) // 2])
    with pytest.raises(RunError, match=f"{RUN_FILE} is not a run record"):
        open_run(copy)
    (copy / RUN_FILE).write_text(json.dumps({"name": "x"}))  # edited: fields missing
    with pytest.raises(RunError, match="not a run record"):
        open_run(copy)
    (copy / RUN_FILE).unlink()
    with pytest.raises(RunError, match="not a finished medtransfer run"):
        open_run(copy)


@pytest.mark.parametrize("damage", ["fifo", "bit_flipped", "missing"])
def test_an_older_run_with_an_unreadable_stored_spec_opens_as_modality_other(
    tiny_run, tmp_path, damage
):
    copy = tmp_path / "old"
    shutil.copytree(tiny_run, copy)
    record = json.loads((copy / RUN_FILE).read_text())
    del record["modality"]
    (copy / RUN_FILE).write_text(json.dumps(record))
    spec_file = copy / SPEC_FILE
    spec_file.unlink()
    if damage == "fifo":
        os.mkfifo(spec_file)  # reading it would block forever
    elif damage == "bit_flipped":
        spec_file.write_bytes(b"modality: \xff\xfe xray\n")  # not UTF-8
    opened = []
    reader = threading.Thread(target=lambda: opened.append(open_run(copy)), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert opened, "open_run blocked on the stored spec"
    assert opened[0].info.modality == "other"
