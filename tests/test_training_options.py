"""Optimiser, schedule and loss options: warm-up then cosine decay, AdamW weight decay, label
smoothing, balanced class weights, and TensorBoard logs in the run directory."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.errors import SpecError
from medtransfer.models.build import (
    balanced_class_weights,
    build_model,
    compile_model,
    make_loss,
)
from medtransfer.spec import spec_from_dict

from .conftest import SHARED_DATA


def spec_with(task="binary", classes=("a", "b"), **training):
    return spec_from_dict(
        {
            "name": "opts",
            "task": task,
            "classes": list(classes),
            "data": {"format": "npz", "path": str(SHARED_DATA / "medmnist" / "breastmnist.npz")},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": "none"},
            "training": {"epochs": 10, "learning_rate": 0.01, **training},
        }
    )


def test_warmup_then_cosine_decay():
    spec = spec_with(warmup_epochs=2, weight_decay=1e-4)
    model = compile_model(build_model(spec), spec, steps_per_epoch=5, warmup_epochs=2)
    schedule = model.optimizer._learning_rate  # the schedule object (learning_rate is its value)
    rate = [float(schedule(step)) for step in (0, 5, 10, 50)]
    assert rate[0] == 0.0
    assert rate[1] == pytest.approx(0.005)  # half-way through the warm-up
    assert rate[2] == pytest.approx(0.01)  # warm-up done: the peak
    assert rate[3] == pytest.approx(0.01 * 0.01, rel=1e-3)  # cosine floor (alpha) at the end
    assert model.optimizer.weight_decay == pytest.approx(1e-4)


def test_no_warmup_starts_at_the_full_rate():
    spec = spec_with()
    model = compile_model(build_model(spec), spec, steps_per_epoch=5)
    assert float(model.optimizer._learning_rate(0)) == pytest.approx(0.01)


def test_label_smoothing_reaches_the_loss():
    spec = spec_with(label_smoothing=0.1)
    model = compile_model(build_model(spec), spec, steps_per_epoch=1)
    y = np.array([[0.0, 1.0]], np.float32)
    p = np.array([[0.0, 1.0]], np.float32)
    assert float(model.loss(y, p)) > 0.1  # a perfect prediction is still penalised


def test_balanced_class_weights_equalise_the_classes():
    y = np.eye(2, dtype=np.float32)[[0] * 147 + [1] * 399]  # BreastMNIST's training balance
    weights = balanced_class_weights(y)
    assert weights == pytest.approx({0: 546 / (2 * 147), 1: 546 / (2 * 399)})
    assert weights[0] * 147 == pytest.approx(weights[1] * 399)
    three = np.eye(3, dtype=np.float32)[[0, 0, 1]]
    assert balanced_class_weights(three)[2] == 0.0


def test_invalid_combinations_are_spec_errors():
    with pytest.raises(SpecError, match="class_weight applies to binary and multiclass"):
        spec_with(task="multilabel", class_weight="balanced")
    with pytest.raises(SpecError, match="warmup_epochs"):
        spec_with(warmup_epochs=10)


def test_run_directory_has_tensorboard_logs(tiny_run):
    logs = tiny_run / "logs"
    assert any(p.name.startswith("events.out.tfevents") for p in logs.rglob("*"))


@pytest.mark.parametrize("task, classes", [("binary", ("a", "b")), ("multilabel", ("a", "b"))])
def test_focal_loss_with_gamma_zero_is_cross_entropy(task, classes):
    y = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)[: 2 if task == "binary" else 3]
    p = np.array([[0.7, 0.3], [0.4, 0.6], [0.8, 0.9]], np.float32)[: len(y)]
    focal = make_loss(spec_with(task, classes, loss="focal", focal_gamma=0.0))
    plain = make_loss(spec_with(task, classes))
    assert float(focal(y, p)) == pytest.approx(float(plain(y, p)), rel=1e-5)


def test_focal_loss_down_weights_easy_examples():
    y = np.array([[1.0, 0.0]], np.float32)
    easy, hard = np.array([[0.95, 0.05]], np.float32), np.array([[0.3, 0.7]], np.float32)
    focal = make_loss(spec_with(loss="focal", focal_gamma=2.0))
    plain = make_loss(spec_with())
    # (1 - p)^gamma: the easy example keeps 0.05^2 of its loss, the hard one 0.7^2
    assert float(focal(y, easy)) == pytest.approx(0.05**2 * float(plain(y, easy)), rel=1e-4)
    assert float(focal(y, hard)) == pytest.approx(0.7**2 * float(plain(y, hard)), rel=1e-4)
