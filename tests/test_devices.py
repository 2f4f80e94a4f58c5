"""Execution plan: strategy from GPUs and TF_CONFIG, GPU-only mixed precision and XLA."""

from __future__ import annotations

import json
from types import SimpleNamespace

import keras
import pytest
import tensorflow as tf

from medtransfer.models.build import build_model
from medtransfer.training.devices import (
    MIRRORED,
    MULTI_WORKER,
    ONE_DEVICE,
    apply_precision,
    plan_execution,
    sharded,
    synchronize_batchnorm,
)

from .test_training_options import spec_with


def cluster(task_type: str, index: int, chief: bool = False) -> str:
    nodes = {"worker": ["host1:2222", "host2:2222"]}
    if chief:
        nodes["chief"] = ["host0:2222"]
    return json.dumps({"cluster": nodes, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    "gpus, tf_config, strategy, workers, chief, fast_math",
    [
        (0, "", ONE_DEVICE, 1, True, False),  # CPU: no float16 emulation, no XLA start-up
        (1, "", ONE_DEVICE, 1, True, True),
        (4, "", MIRRORED, 1, True, True),
        (0, cluster("worker", 0), MULTI_WORKER, 2, True, False),  # worker 0 leads without a chief
        (2, cluster("worker", 1), MULTI_WORKER, 2, False, True),
        (2, cluster("worker", 0, chief=True), MULTI_WORKER, 3, False, True),
        (2, cluster("chief", 0, chief=True), MULTI_WORKER, 3, True, True),
        (2, json.dumps({"cluster": {"worker": ["a:1"]}, "task": {}}), MIRRORED, 1, True, True),
    ],
)
def test_plan_follows_devices_and_cluster(gpus, tf_config, strategy, workers, chief, fast_math):
    plan = plan_execution(gpus=gpus, tf_config=tf_config)
    assert (plan.strategy, plan.workers, plan.is_chief) == (strategy, workers, chief)
    assert plan.mixed_precision is fast_math and plan.jit_compile is fast_math


def test_bad_tf_config_is_a_clear_error():
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        plan_execution(gpus=0, tf_config="{cluster")


def test_this_machine_trains_on_one_cpu_without_mixed_precision_or_xla(tiny_run):
    recorded = json.loads((tiny_run / "run.json").read_text())["execution"]
    assert recorded == {
        "strategy": ONE_DEVICE,
        "gpus": 0,
        "workers": 1,
        "mixed_precision": False,
        "xla": False,
    }


def test_mixed_precision_keeps_the_probabilities_float32():
    apply_precision(plan_execution(gpus=1, tf_config=""))
    try:
        model = build_model(spec_with())
        assert model.get_layer("backbone").compute_dtype == "float16"
        assert model.output.dtype == "float32"
    finally:
        apply_precision(plan_execution(gpus=0, tf_config=""))
    assert keras.config.dtype_policy().name == "float32"


def test_in_memory_datasets_are_shared_out_by_their_batches():
    dataset = sharded(tf.data.Dataset.range(10).batch(4))
    policy = dataset.options().experimental_distribute.auto_shard_policy
    assert policy == tf.data.experimental.AutoShardPolicy.DATA
    assert [b.tolist() for b in dataset.as_numpy_iterator()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


@pytest.mark.parametrize("replicas, synchronized", [(1, False), (2, True)])
def test_batchnorm_uses_the_global_batch_only_across_replicas(replicas, synchronized):
    model = build_model(spec_with())  # MobileNetV3Small: BatchNormalization in every block
    synchronize_batchnorm(model, SimpleNamespace(num_replicas_in_sync=replicas))
    flags = [
        layer.synchronized
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert len(flags) == 34 and set(flags) == {synchronized}
