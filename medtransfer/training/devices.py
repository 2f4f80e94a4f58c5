"""Where training runs: one device, several GPUs, or several machines, chosen from what is there.

The same spec trains on a laptop CPU, a workstation with four GPUs and a cluster without a
flag: the ``tf.distribute`` strategy follows the visible GPUs and ``TF_CONFIG``, and the
GPU-only speed-ups (mixed precision, XLA) switch on only where they pay. On CPU, float16
arithmetic is emulated (slower, not faster) and XLA compilation costs more start-up time than
it saves, so both stay off.

``training.batch_size`` stays the global batch: a strategy splits it across replicas, so a
recipe means the same optimisation on one device or eight.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

ONE_DEVICE, MIRRORED, MULTI_WORKER = "one_device", "mirrored", "multi_worker"


@dataclass(frozen=True)
class ExecutionPlan:
    """What :func:`plan_execution` decided, before any strategy object exists (testable)."""

    strategy: str  # ONE_DEVICE, MIRRORED or MULTI_WORKER
    gpus: int
    workers: int
    is_chief: bool
    mixed_precision: bool
    jit_compile: bool

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "gpus": self.gpus,
            "workers": self.workers,
            "mixed_precision": self.mixed_precision,
            "xla": self.jit_compile,
        }


def plan_execution(gpus: int | None = None, tf_config: str | None = None) -> ExecutionPlan:
    """Pick the strategy: TF_CONFIG with more than one worker -> multi-worker; else more than one
    GPU -> mirrored; else the default one-device strategy. Defaults read the machine."""
    if gpus is None:
        gpus = len(tf.config.list_physical_devices("GPU"))
    if tf_config is None:
        tf_config = os.environ.get("TF_CONFIG", "")
    cluster, task = _cluster(tf_config)
    workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if workers > 1:
        strategy = MULTI_WORKER
        is_chief = task.get("type") == "chief" or (
            "chief" not in cluster and task.get("type") == "worker" and task.get("index", 0) == 0
        )
    else:
        strategy, workers, is_chief = (MIRRORED if gpus > 1 else ONE_DEVICE), 1, True
    return ExecutionPlan(strategy, gpus, workers, is_chief, gpus > 0, gpus > 0)


def _cluster(tf_config: str) -> tuple[dict, dict]:
    if not tf_config.strip():
        return {}, {}
    try:
        config = json.loads(tf_config)
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not valid JSON: {error}") from None
    return config.get("cluster", {}), config.get("task", {})


def make_strategy(plan: ExecutionPlan) -> tf.distribute.Strategy:
    if plan.strategy == MULTI_WORKER:
        return tf.distribute.MultiWorkerMirroredStrategy()
    if plan.strategy == MIRRORED:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def apply_precision(plan: ExecutionPlan) -> None:
    """Set Keras's global dtype policy for models built from now on (the head stays float32)."""
    keras.config.set_dtype_policy("mixed_float16" if plan.mixed_precision else "float32")
