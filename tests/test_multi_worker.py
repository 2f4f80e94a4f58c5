"""Two real worker processes train one run: ``medtransfer train`` started twice with
``TF_CONFIG`` naming a two-worker cluster on 127.0.0.1 (MultiWorkerMirroredStrategy, CPU).

Only the chief (worker 0) writes the run directory; the result is that of one process with the
same global batch, up to the order of floating-point sums; and a cluster killed after a
checkpoint resumes to the weights of one that was never stopped.

The spec is a transfer-learning run, as the toolkit's users train: a backbone from a local
weights file, a head phase (backbone frozen) then a fine-tuning phase whose unfrozen blocks
train their BatchNormalization (synchronised across the workers). Dropout is off: each replica
draws its own masks, so with dropout two workers match one process in distribution only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from medtransfer.models.backbones import build_backbone
from medtransfer.rundir import CHECKPOINT_FILE, HISTORY_FILE, RUN_FILE, open_run
from medtransfer.spec import spec_from_dict
from medtransfer.training.checkpoint import load_checkpoint
from medtransfer.training.run import train

from .conftest import REPO, SHARED_DATA

pytestmark = pytest.mark.slow  # 2.5-4 min on 2 CPU cores: one process, three 2-worker runs

TIMEOUT = 600  # seconds for a cluster's run; every wait below has a limit
# Two workers against one process, measured on this CPU with two weights files: history (losses
# and metrics of every epoch) within 3.5e-4, every weight within 2.2e-3. One process against
# itself with oneDNN off (TF_ENABLE_ONEDNN_OPTS=0: another summation order) differs as much
# (4.2e-4, 1.6e-3): rounding, not another computation. Unsynchronised BatchNormalization, a
# different computation, misses the history by 1.5e-2. The weights' bound is the optimiser's:
# Adam divides a gradient by its own size, so a parameter whose gradient is rounding noise moves
# a full step (the learning rate: 1e-3 head, 1e-4 fine-tuning) whichever way rounding sends it.
HISTORY_ATOL = 2e-3
WEIGHTS_ATOL = 1e-2
RUN_FILES = [
    "checkpoint.npz",
    "history.csv",
    "logs",
    "manifest.csv",
    "model.keras",
    "ood_reference.npz",
    "profile.json",
    "run.json",
    "spec.yaml",
]


def spec_config(weights: Path) -> dict:
    return {
        "name": "two_workers",
        "task": "binary",
        "classes": ["malignant", "normal_or_benign"],
        "positive_class": "malignant",
        "data": {"format": "npz", "path": str(SHARED_DATA / "medmnist" / "breastmnist.npz")},
        "image": {"size": [32, 32], "channels": 1},
        "model": {"backbone": "mobilenetv3small", "weights": str(weights), "dropout": 0.0},
        "training": {
            "epochs": 3,
            "batch_size": 32,  # global: 16 per worker
            "seed": 1,
            "fine_tune": {"head_epochs": 1, "batchnorm": "train"},
        },
    }


@dataclass(frozen=True)
class Worker:
    """One worker's ``--out``, its own ``TMPDIR`` and the log of its output."""

    out: Path
    tmp: Path
    log: Path

    @classmethod
    def under(cls, root: Path, name: str) -> Worker:
        (root / name / "tmp").mkdir(parents=True)
        return cls(root / name / "run", root / name / "tmp", root / f"{name}.log")


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (all held at once, so they differ)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


@contextmanager
def cluster(workers: list[Worker], *args: str) -> Iterator[list[subprocess.Popen]]:
    """``medtransfer train --out W.out ARGS`` for each worker, worker 0 the chief; on leaving,
    whatever happened, any worker still running is killed and reaped."""
    addresses = [f"127.0.0.1:{port}" for port in free_ports(len(workers))]
    processes: list[subprocess.Popen] = []
    try:
        for index, worker in enumerate(workers):
            task = {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(task), "TMPDIR": str(worker.tmp)}
            command = ["-m", "medtransfer.cli", "train", "--out", str(worker.out), *args]
            with open(worker.log, "ab") as log:
                processes.append(
                    subprocess.Popen(
                        [sys.executable, *command, "--workers", "0"],
                        cwd=REPO,
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group, killed as one
                    )
                )
        yield processes
    finally:
        kill(processes)


def kill(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    for process in processes:
        process.wait(timeout=60)


def finish(processes: list[subprocess.Popen], workers: list[Worker]) -> None:
    """Wait for every worker to exit 0; fail as soon as one exits otherwise (the others would
    wait for it until TensorFlow gives up) or when ``TIMEOUT`` is up."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        codes = [process.poll() for process in processes]
        for index, code in enumerate(codes):
            if code not in (None, 0):
                pytest.fail(f"worker {index} exited with {code}:\n{tail(workers[index].log)}")
        if all(code == 0 for code in codes):
            return
        if time.monotonic() > deadline:
            running = [i for i, code in enumerate(codes) if code is None]
            pytest.fail(f"workers {running} still running after {TIMEOUT} s")
        time.sleep(0.5)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_checkpoint(run_dir: Path, epochs: int, processes: list[subprocess.Popen]) -> None:
    """Return once the chief's checkpoint holds ``epochs`` epochs (it is replaced atomically)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in processes):
            pytest.fail(f"a worker ended before the checkpoint of epoch {epochs}")
        checkpoint = run_dir / CHECKPOINT_FILE
        if checkpoint.is_file() and load_checkpoint(run_dir).state.epochs >= epochs:
            return
        time.sleep(0.2)
    pytest.fail(f"no checkpoint of epoch {epochs} in {run_dir} after {TIMEOUT} s")


def contents(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` by relative path, with its SHA-256."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multi_worker_spec")
    weights = root / "mobilenet.weights.h5"  # stands in for pretrained weights (offline here)
    build_backbone("mobilenetv3small", "none", (32, 32, 3)).save_weights(weights)
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec_config(weights)))
    return path


@pytest.fixture(scope="module")
def one_process(spec_file, tmp_path_factory) -> Path:
    """The reference: the same spec, global batch and seed, trained by this process alone."""
    spec = spec_from_dict(yaml.safe_load(spec_file.read_text()), base_dir=spec_file.parent)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("TF_CONFIG", raising=False)
        return train(spec, tmp_path_factory.mktemp("one_process") / "run", workers=0).path


@pytest.fixture(scope="module")
def two_workers(spec_file, tmp_path_factory) -> tuple[Worker, Worker]:
    """Two workers trained to the end, each given its own ``--out``."""
    root = tmp_path_factory.mktemp("two_workers")
    workers = [Worker.under(root, "chief"), Worker.under(root, "worker1")]
    with cluster(workers, "--spec", str(spec_file)) as processes:
        finish(processes, workers)
    return workers[0], workers[1]


def test_only_the_chief_writes_the_run(two_workers):
    chief, other = two_workers
    assert sorted(entry.name for entry in chief.out.iterdir()) == RUN_FILES
    assert open_run(chief.out).info.execution == {
        "strategy": "multi_worker",
        "gpus": 0,
        "workers": 2,
        "mixed_precision": False,
        "xla": False,
    }
    # worker 1 wrote its checkpoints and model into a temporary folder, removed at its end
    assert not other.out.exists()
    assert list(other.tmp.iterdir()) == []


def test_two_workers_train_as_one_process_with_the_global_batch(two_workers, one_process):
    chief, _ = two_workers
    together, alone = open_run(chief.out).info, open_run(one_process).info
    assert together.phases == alone.phases
    assert (together.epochs_run, together.best_epoch) == (alone.epochs_run, alone.best_epoch)
    history, reference = (pd.read_csv(path / HISTORY_FILE) for path in (chief.out, one_process))
    assert list(history.columns) == list(reference.columns)
    assert history["epoch"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(history, reference, rtol=0, atol=HISTORY_ATOL)
    got, want = load_checkpoint(chief.out), load_checkpoint(one_process)
    # the loop's bookkeeping (phase, epochs, data fingerprint), val_auc aside: compared above
    assert {**got.state.__dict__, "val_auc": None} == {**want.state.__dict__, "val_auc": None}
    for index, (value, expected) in enumerate(
        zip(got.model_values, want.model_values, strict=True)
    ):
        np.testing.assert_allclose(
            value, expected, rtol=0, atol=WEIGHTS_ATOL, err_msg=f"model variable {index}"
        )


def test_killed_cluster_resumes_to_the_uninterrupted_weights(spec_file, two_workers, tmp_path):
    workers = [Worker.under(tmp_path, "chief"), Worker.under(tmp_path, "worker1")]
    chief, other = workers
    with cluster(workers, "--spec", str(spec_file)) as processes:
        wait_for_checkpoint(chief.out, 2, processes)
        kill(processes)  # both at once, as a cancelled job or a lost machine stops them
    state = load_checkpoint(chief.out).state
    # inside the fine-tuning phase: the resumed run must restore the optimizer's state too
    assert (state.epochs, state.phase, state.phase_epochs) == (2, 1, 1)
    assert not (chief.out / RUN_FILE).exists() and not other.out.exists()
    kept_history = (chief.out / HISTORY_FILE).read_text().splitlines()[:3]
    # a killed process cannot clean up: its scratch run stays (and autograph's temporary files)
    leftovers = sorted(os.listdir(other.tmp))
    assert sum(name.startswith("medtransfer-worker-") for name in leftovers) == 1

    # worker 1 resumes from the run as a shared filesystem (here: a copy) shows it the run
    shutil.copytree(chief.out, other.out)
    seen_by_worker = contents(other.out)
    with cluster(workers, "--resume") as processes:
        finish(processes, workers)

    resumed = open_run(chief.out).info
    assert resumed.resumed and resumed.epochs_run == 3
    assert (chief.out / HISTORY_FILE).read_text().splitlines()[:3] == kept_history
    uninterrupted = two_workers[0].out
    history = pd.read_csv(chief.out / HISTORY_FILE)
    pd.testing.assert_frame_equal(history, pd.read_csv(uninterrupted / HISTORY_FILE))
    got, want = load_checkpoint(chief.out), load_checkpoint(uninterrupted)
    assert got.state == want.state
    for got_value, want_value in zip(
        got.model_values + got.optimizer_values,
        want.model_values + want.optimizer_values,
        strict=True,
    ):
        np.testing.assert_array_equal(got_value, want_value)
    # worker 1 only read its run directory; its resumed scratch run is gone
    assert contents(other.out) == seen_by_worker
    assert sorted(os.listdir(other.tmp)) == leftovers
