"""Where training runs: one device, several GPUs, or several machines, chosen from what is there.

The same spec trains on a laptop CPU, a workstation with four GPUs and a cluster without a
flag: the ``tf.distribute`` strategy follows the visible GPUs and ``TF_CONFIG``, and the
GPU-only speed-ups (mixed precision, XLA) switch on only where they pay. On CPU, float16
arithmetic is emulated (slower, not faster) and XLA compilation costs more start-up time than
it saves, so both stay off.

``training.batch_size`` stays the global batch: a strategy splits it across replicas, so a
recipe means the same optimisation on one device or eight.

Several workers (``TF_CONFIG`` naming more than one): every worker runs the same command and
builds the same global batches (the data order and augmentation are keyed by seed and epoch,
not by process); each takes its slice of every batch (:func:`sharded`), gradients and
BatchNormalization statistics are summed over all replicas (:func:`synchronize_batchnorm`),
and only the chief writes the run directory (``medtransfer.training.run``). Two workers with
batch B train as one process with batch B, up to the order of floating-point sums.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import keras
import tensorflow as tf

from medtransfer.models.backbones import all_layers

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


class _MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` takes what Keras 3's ``fit`` gives it.

    Keras's multi-worker path (keras-team/keras#20585) calls ``reduce`` with a whole ``(x, y)``
    batch, to build the model, and with ``axis=0`` on each step's scalar loss and metrics; the
    collective implementation takes one value at a time and fails on both ("Attempt to convert
    a value (PerReplica ...)", "Invalid reduction dimension 0 for input with 0 dimensions").
    Reducing leaf by leaf, a scalar across replicas, is what those calls mean. The epoch's
    logs, which callbacks and ``history.csv`` see, are read from the metrics' variables, summed
    over every replica, and do not go through here.
    """

    def reduce(self, reduce_op: Any, value: Any, axis: int | None = None) -> Any:
        reduce_one = super().reduce

        def leaf(v: Any) -> Any:
            scalar = self.experimental_local_results(v)[0].shape.rank == 0
            return reduce_one(reduce_op, v, axis=None if scalar else axis)

        return tf.nest.map_structure(leaf, value)


def make_strategy(plan: ExecutionPlan) -> tf.distribute.Strategy:
    if plan.strategy == MULTI_WORKER:
        return _MultiWorkerStrategy()
    if plan.strategy == MIRRORED:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def sharded(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` to be split among workers by its elements (``AutoShardPolicy.DATA``).

    The datasets here come from in-memory arrays: there are no files to share out, which the
    default policy (AUTO) tries first and warns about. With DATA every worker builds the same
    global batches and keeps its replicas' slice of each; without a distribution strategy the
    option does nothing.
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def synchronize_batchnorm(model: keras.Model, strategy: tf.distribute.Strategy) -> None:
    """With more than one replica, let BatchNormalization layers that train normalise by the
    statistics of the global batch, summed over the replicas, instead of their own slice's.

    Otherwise each of two workers normalises by half a batch: a different computation from one
    process with the same global batch, and a noisier one (medical batches are small already).
    Layers in inference mode (frozen, or a fine-tuned pretrained backbone's) use their moving
    statistics and are unaffected. The flag is stored in the saved model's config, where it is
    inert: a model predicts with its moving statistics.
    """
    if strategy.num_replicas_in_sync < 2:
        return
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.synchronized = True


def leave_together(plan: ExecutionPlan, strategy: tf.distribute.Strategy) -> None:
    """Multi-worker: return once every worker got here (a one-number all-reduce as a barrier).

    A worker that exits while another still works (the chief writes the run after the last
    epoch) is reported as crashed by TensorFlow's coordination service, whose heartbeat check
    can then abort the others; so every worker stays until the last is done.
    """
    if plan.strategy == MULTI_WORKER:
        one = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(1.0))
        strategy.reduce("SUM", one, axis=None)


def apply_precision(plan: ExecutionPlan) -> None:
    """Set Keras's global dtype policy for models built from now on (the head stays float32)."""
    keras.config.set_dtype_policy("mixed_float16" if plan.mixed_precision else "float32")
