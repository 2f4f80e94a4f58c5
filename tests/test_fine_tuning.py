"""The two-phase fine-tuning schedule: frozen backbone first, then only the top blocks, with
BatchNormalization statistics untouched throughout; random-init backbones train whole."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import pytest

from medtransfer.errors import SpecError, WeightsUnavailableError
from medtransfer.evaluation.plots import history_figure
from medtransfer.models.backbones import backbone_blocks, build_backbone
from medtransfer.models.build import build_model, compile_model
from medtransfer.models.saved import load_run_model
from medtransfer.spec import spec_from_dict
from medtransfer.training.run import train
from medtransfer.training.schedule import plan_phases

from .conftest import make_png_folders


def spec_for(data, weights: str, **training):
    return spec_from_dict(
        {
            "name": "ft",
            "task": "binary",
            "classes": ["plain", "spot"],
            "data": {"format": "folders", "path": str(data)},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": weights},
            "training": {"batch_size": 8, "learning_rate": 0.01, **training},
        }
    )


def test_phase_plan(tmp_path):
    data = make_png_folders(tmp_path / "data", per_class=2)
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")  # the plan only looks at the name
    assert [(p.name, p.epochs) for p in plan_phases(spec_for(data, "none", epochs=7))] == [
        ("full", 7)
    ]
    phases = plan_phases(spec_for(data, str(weights), epochs=7))
    assert [(p.name, p.epochs) for p in phases] == [("head", 3), ("fine_tune", 4)]
    assert phases[1].learning_rate == pytest.approx(0.001)
    short = spec_for(data, str(weights), epochs=2, fine_tune={"head_epochs": 5})
    with pytest.warns(UserWarning, match="stays frozen throughout"):
        assert [(p.name, p.epochs) for p in plan_phases(short)] == [("head", 2)]


def moved_layers(source: keras.Model, target: keras.Model) -> set[str]:
    """Names (in ``target``) of layers whose weights differ; layers pair up by position because
    two builds of one architecture number their auto-named layers differently."""
    moved = set()
    for a, b in zip(source.layers, target.layers, strict=True):
        before, after = [np.asarray(w) for w in a.weights], [np.asarray(w) for w in b.weights]
        if changed(before, after):
            moved.add(b.name)
    return moved


def changed(before: list[np.ndarray], after: list[np.ndarray]) -> bool:
    return any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.fixture(scope="module")
def pretrained_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    data = make_png_folders(root / "data", per_class=8)
    pretrained = build_backbone("mobilenetv3small", "none", (32, 32, 3))
    weights = root / "pretrained.weights.h5"
    pretrained.save_weights(weights)
    spec = spec_for(data, str(weights), epochs=2, fine_tune={"head_epochs": 1, "unfreeze": 1})
    return root, pretrained, spec


def fit_phase(model, spec, phase):
    phase.apply(model, spec)
    compile_model(model, spec, steps_per_epoch=2, learning_rate=phase.learning_rate, epochs=1)
    rng = np.random.default_rng(0)
    x = rng.random((16, 32, 32, 1), dtype=np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 16)]
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)


def test_head_phase_freezes_the_backbone_then_only_top_blocks_learn(pretrained_setup):
    _, pretrained, spec = pretrained_setup
    model = build_model(spec)
    backbone = model.get_layer("backbone")
    head, tune = plan_phases(spec)
    start_head = [np.asarray(w) for w in model.get_layer("probabilities").weights]

    fit_phase(model, spec, head)
    assert not moved_layers(pretrained, backbone), "phase 1 must not touch the backbone"
    assert changed(start_head, [np.asarray(w) for w in model.get_layer("probabilities").weights])

    fit_phase(model, spec, tune)
    moved = moved_layers(pretrained, backbone)
    top = {layer.name for layer in backbone_blocks(backbone, "mobilenetv3small")[-1]}
    assert moved, "the top block should learn in phase 2"
    assert moved <= top, f"layers outside the top block changed: {sorted(moved - top)[:5]}"
    batchnorm = {
        layer.name
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert not moved & batchnorm, "BatchNormalization statistics must stay frozen"


def test_train_runs_the_phases_and_records_them(pretrained_setup):
    root, _, spec = pretrained_setup
    run = train(spec, root / "run", workers=0)
    assert [p["name"] for p in run.info.phases] == ["head", "fine_tune"]
    assert [(p["first_epoch"], p["epochs_run"]) for p in run.info.phases] == [(1, 1), (2, 1)]
    assert json.loads((run.path / "run.json").read_text())["epochs_run"] == 2
    figure = history_figure(pd.read_csv(run.path / "history.csv").to_dict("list"), run.info.phases)
    boundaries = [line.get_xdata()[0] for line in figure.axes[0].lines[2:]]
    assert boundaries == [1.5]  # between epoch 1 (head) and epoch 2 (fine_tune)
    lines = (run.path / "history.csv").read_text().strip().splitlines()
    assert len(lines) == 3  # header + one row per epoch, across both phases
    assert [line.split(",")[0] for line in lines[1:]] == ["1", "2"]  # as run.json counts them


def test_medical_source_pretraining_starts_from_another_runs_backbone(tiny_run, tmp_path):
    data = make_png_folders(tmp_path / "data", per_class=2)
    spec = spec_for(data, f"run:{tiny_run}")
    source = load_run_model(tiny_run).get_layer("backbone")
    target = build_model(spec).get_layer("backbone")
    for a, b in zip(source.weights, target.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert [p.name for p in plan_phases(spec.with_overrides(training={"epochs": 5}))] == [
        "head",
        "fine_tune",
    ]
    # batchnorm: auto lets a medical source's BatchNormalization learn the target; frozen not
    for setting, expected in (("auto", True), ("frozen", False), ("train", True)):
        tuned = spec.with_overrides(training={"epochs": 5, "fine_tune": {"batchnorm": setting}})
        model = build_model(tuned)
        plan_phases(tuned)[1].apply(model, tuned)
        top = backbone_blocks(model.get_layer("backbone"), "mobilenetv3small")[-1]
        norms = [layer for layer in top if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(layer.trainable is expected for layer in norms), setting
    other = spec.with_overrides(model={"backbone": "efficientnetb0"})
    with pytest.raises(WeightsUnavailableError, match="trained a mobilenetv3small backbone"):
        build_model(other)
    with pytest.raises(SpecError, match="is not a finished medtransfer run"):
        spec_for(data, f"run:{tmp_path}")
