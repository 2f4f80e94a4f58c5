"""The last checkpoint: everything a killed training needs to carry on as if it never stopped.

After every epoch the run directory gets ``checkpoint.npz``: the model's variables (including
the random-seed state of Dropout and stochastic-depth layers, so the resumed run draws the same
masks), the optimizer's variables (moments, step count, hence the learning-rate schedule's
position), and the bookkeeping of the loop around ``model.fit`` (phase, epochs, validation
AUROC so far, early-stopping counters). One file, replaced atomically: a run killed at any
moment leaves either the previous epoch's checkpoint or this one, never a mix.

With the epoch-keyed data order of :func:`medtransfer.data.pipeline.make_training_dataset`, a
resumed run reaches the same final weights as an uninterrupted one with the same seed.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.rundir import CHECKPOINT_FILE

_STATE_KEY = "state"


@dataclass
class TrainingState:
    """Where the loop around ``model.fit`` stands after the last completed epoch."""

    phase: int = 0  # index into the planned phases
    phase_epochs: int = 0  # epochs completed in that phase
    phase_finished: bool = False  # its epochs ran out, or early stopping ended it
    val_auc: list[float] = field(default_factory=list)  # one per completed epoch, all phases
    phase_starts: list[int] = field(default_factory=list)  # 0-based first epoch of each phase
    early_stopping: dict[str, Any] = field(default_factory=dict)
    data_fingerprint: str = ""

    @property
    def epochs(self) -> int:
        return len(self.val_auc)


@dataclass(frozen=True)
class Checkpoint:
    state: TrainingState
    model_values: list[np.ndarray]
    optimizer_values: list[np.ndarray]

    def restore(self, model: keras.Model, *, optimizer: bool) -> None:
        """Load the variables into a model built (and, for ``optimizer``, compiled) as before.

        The optimizer's state only transfers within the phase that wrote it: a new phase starts
        a fresh optimizer, exactly as the uninterrupted run does.
        """
        _assign(model.variables, self.model_values, "model")
        if optimizer:
            model.optimizer.build(model.trainable_variables)
            _assign(model.optimizer.variables, self.optimizer_values, "optimizer")


def _assign(variables: list, values: list[np.ndarray], what: str) -> None:
    shapes = [tuple(v.shape) for v in variables]
    if shapes != [value.shape for value in values]:
        raise RunError(
            f"the checkpoint's {what} state does not fit this model ({len(values)} arrays saved, "
            f"{len(variables)} expected): was the run's spec or medtransfer changed?"
        )
    for variable, value in zip(variables, values, strict=True):
        variable.assign(value)


def snapshot(model: keras.Model, state: TrainingState) -> dict[str, np.ndarray]:
    """Copies of every array a checkpoint holds, taken between two training steps."""
    arrays = {f"m{i}": v.numpy() for i, v in enumerate(model.variables)}
    arrays |= {f"o{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)}
    arrays[_STATE_KEY] = np.array(json.dumps(state.__dict__))
    return arrays


def write_checkpoint(run_dir: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic.replace_on_success(run_dir / CHECKPOINT_FILE, "wb") as handle:
        np.savez(handle, **arrays)


def load_checkpoint(run_dir: Path) -> Checkpoint:
    path = run_dir / CHECKPOINT_FILE
    if not path.is_file():
        raise RunError(f"{run_dir} has no {CHECKPOINT_FILE}: nothing to resume")
    with np.load(path) as arrays:
        state = TrainingState(**json.loads(str(arrays[_STATE_KEY])))
        model_values = _numbered(arrays, "m")
        optimizer_values = _numbered(arrays, "o")
    return Checkpoint(state, model_values, optimizer_values)


def _numbered(arrays: Any, prefix: str) -> list[np.ndarray]:
    count = sum(1 for key in arrays.files if key.startswith(prefix))
    return [arrays[f"{prefix}{i}"] for i in range(count)]


class EpochCheckpoint(keras.callbacks.Callback):
    """Writes :data:`CHECKPOINT_FILE` at the end of every epoch (goes after the other callbacks).

    The arrays are copied at the epoch's end and written by a background thread while the next
    epoch trains: a ResNet50 checkpoint is ~280 MB and ~1 s of disk time that would otherwise
    stall every epoch. A write still running is waited for before the next one and at the end
    of training, so at most one epoch is in flight; a failed write surfaces there.

    It also carries the early-stopping counters across a restart: ``EarlyStopping`` resets
    them at the start of every ``fit``, so they are put back right after.
    """

    def __init__(
        self,
        run_dir: Path,
        state: TrainingState,
        phase_epochs: int,
        early_stopping: keras.callbacks.EarlyStopping | None,
    ) -> None:
        super().__init__()
        self.run_dir, self.state, self.phase_epochs = run_dir, state, phase_epochs
        self.early_stopping = early_stopping
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending: Future | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.early_stopping is not None and self.state.early_stopping:
            for name, value in self.state.early_stopping.items():
                setattr(self.early_stopping, name, value)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        state = self.state
        state.val_auc.append(float((logs or {}).get("val_auc", float("nan"))))
        state.phase_epochs += 1
        state.phase_finished = state.phase_epochs >= self.phase_epochs or self.model.stop_training
        if self.early_stopping is not None:
            stopper = self.early_stopping
            best = None if stopper.best is None else float(stopper.best)
            state.early_stopping = {"wait": stopper.wait, "best": best}
        self._wait()
        arrays = snapshot(self.model, state)
        self._pending = self._writer.submit(write_checkpoint, self.run_dir, arrays)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.close()

    def close(self) -> None:
        """Finish the write in flight; ``fit`` skips ``on_train_end`` when it raises."""
        self._wait()
        self._writer.shutdown()

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()
