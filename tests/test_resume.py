"""A killed training resumes from its last completed epoch and ends with the same weights as an
uninterrupted run with the same seed (CPU)."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from medtransfer.errors import RunError
from medtransfer.models.backbones import build_backbone
from medtransfer.rundir import HISTORY_FILE, RUN_FILE, SPEC_FILE
from medtransfer.spec import dump_spec, spec_from_dict
from medtransfer.training.checkpoint import TrainingState, load_checkpoint, write_checkpoint
from medtransfer.training.run import _truncate_history, train

from .conftest import make_png_folders


class Killed(Exception):
    pass


class KillAfterEpoch(keras.callbacks.Callback):
    """Stands in for a SIGKILL: stops the process's training right after an epoch's checkpoint."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Killed


@pytest.fixture(scope="module")
def make_spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    data = make_png_folders(root / "data", per_class=10, size=32)
    weights = root / "mobilenet.weights.h5"
    build_backbone("mobilenetv3small", "none", (32, 32, 3)).save_weights(weights)

    def make(weights_source: str = "none", **training):
        return spec_from_dict(
            {
                "name": "resume",
                "task": "binary",
                "classes": ["plain", "spot"],
                "data": {"format": "folders", "path": str(data)},
                "image": {"size": [32, 32], "channels": 1},
                "model": {
                    "backbone": "mobilenetv3small",
                    "weights": str(weights) if weights_source == "file" else "none",
                    "dropout": 0.3,  # random masks: their seed state must resume too
                },
                "training": {"epochs": 4, "batch_size": 8, "seed": 3, **training},
            },
            base_dir=root,
        )

    return make


def final_weights(run_dir):
    return load_checkpoint(run_dir).model_values


def interrupted_then_resumed(spec, run_dir, kill_epoch):
    with pytest.raises(Killed):
        train(spec, run_dir, workers=0, callbacks=[KillAfterEpoch(kill_epoch)])
    assert not (run_dir / RUN_FILE).exists()
    assert load_checkpoint(run_dir).state.epochs == kill_epoch + 1
    return train(None, run_dir, resume=True, workers=0)


def assert_same_run(resumed, reference):
    for got, want in zip(final_weights(resumed.path), final_weights(reference.path), strict=True):
        np.testing.assert_array_equal(got, want)
    assert resumed.info.best_epoch == reference.info.best_epoch
    assert resumed.info.resumed and not reference.info.resumed
    history = pd.read_csv(resumed.path / HISTORY_FILE)
    # 1-based, as the console counts them
    assert history["epoch"].tolist() == list(range(1, reference.info.epochs_run + 1))
    np.testing.assert_allclose(
        history["val_auc"], pd.read_csv(reference.path / HISTORY_FILE)["val_auc"], rtol=0, atol=0
    )


@pytest.mark.slow
def test_resumed_single_phase_run_matches_uninterrupted(make_spec, tmp_path):
    spec = make_spec()
    reference = train(spec, tmp_path / "whole", workers=0)
    resumed = interrupted_then_resumed(spec, tmp_path / "killed", kill_epoch=1)
    assert_same_run(resumed, reference)


@pytest.fixture(scope="module")
def two_phase(make_spec, tmp_path_factory):
    spec = make_spec("file", fine_tune={"head_epochs": 2})
    reference = train(spec, tmp_path_factory.mktemp("two_phase") / "whole", workers=0)
    assert [p["name"] for p in reference.info.phases] == ["head", "fine_tune"]
    return spec, reference


@pytest.mark.parametrize(
    "kill_epoch",
    [
        pytest.param(0, marks=pytest.mark.slow),  # inside the head phase
        pytest.param(1, marks=pytest.mark.slow),  # at its end: the next phase starts afresh
        2,  # inside fine-tuning: the head phase is skipped, the optimizer state restored
    ],
)
def test_resumed_two_phase_run_matches_uninterrupted(two_phase, tmp_path, kill_epoch):
    spec, reference = two_phase
    resumed = interrupted_then_resumed(spec, tmp_path / "killed", kill_epoch)
    assert_same_run(resumed, reference)


@pytest.mark.slow
def test_early_stopping_counters_survive_a_restart(make_spec, tmp_path):
    spec = make_spec(epochs=8, early_stopping_patience=1)
    reference = train(spec, tmp_path / "whole", workers=0)
    resumed = interrupted_then_resumed(spec, tmp_path / "killed", kill_epoch=1)
    assert resumed.info.epochs_run == reference.info.epochs_run
    assert_same_run(resumed, reference)


def test_resume_refuses_finished_runs_changed_specs_and_non_runs(two_phase, tmp_path):
    spec, finished = two_phase
    with pytest.raises(RunError, match="finished run"):
        train(None, finished.path, resume=True)
    with pytest.raises(RunError, match=r"no spec\.yaml"):
        train(None, tmp_path / "empty", resume=True)
    started = tmp_path / "started"  # killed before its first epoch ended: no checkpoint yet
    started.mkdir()
    (started / SPEC_FILE).write_text(dump_spec(spec))
    with pytest.raises(RunError, match="differs from the one"):
        train(spec.with_overrides(training={"learning_rate": 0.5}), started, resume=True)
    stale = {"state": np.array(json.dumps(TrainingState(data_fingerprint="other").__dict__))}
    write_checkpoint(started, stale)  # a checkpoint taken on different data
    with pytest.raises(RunError, match=r"data behind .* changed since the run started"):
        train(None, started, resume=True, workers=0)


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_starts_again(make_spec, tmp_path):
    spec = make_spec(epochs=1)
    started = tmp_path / "started"
    started.mkdir()
    (started / SPEC_FILE).write_text(dump_spec(spec))
    (started / HISTORY_FILE).write_text("epoch,half a row")
    run = train(None, started, resume=True, workers=0)
    assert run.info.epochs_run == 1
    assert pd.read_csv(started / HISTORY_FILE)["epoch"].tolist() == [1]


def test_history_is_cut_to_the_checkpointed_epochs(tmp_path):
    history = tmp_path / HISTORY_FILE
    history.write_text("epoch,auc,loss\n1,0.5,0.7\n2,0.6,0.6\n3,0.7,0.5\n")
    _truncate_history(history, 2)
    assert history.read_text() == "epoch,auc,loss\n1,0.5,0.7\n2,0.6,0.6\n"


def test_a_run_started_with_0_based_history_is_renumbered_on_resume(tmp_path):
    history = tmp_path / HISTORY_FILE
    history.write_text("epoch,auc,loss\n0,0.5,0.7\n1,0.6,0.6\n2,0.7,0.5\n")
    _truncate_history(history, 2)
    assert history.read_text() == "epoch,auc,loss\n1,0.5,0.7\n2,0.6,0.6\n"
