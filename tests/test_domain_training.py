"""Domain adaptation in training runs (issue 7): the spec section, the two data streams, DANN /
CORAL / MMD / AdaBN through ``train``, resume, the saved model, and ``medtransfer sites``.

Data: tiny generated PNGs at two sites, 32 px; the target site is darker and flatter, and its
training images carry deliberately wrong labels (every one says "spot"), so a target label that
reached the loss would show. Models: MobileNetV3Small from random weights, 1-2 epochs.

Tracing MobileNetV3Small's train step costs ~10 s per run, far more than these runs' few steps.
One run (DANN, the method with the most moving parts) trains as ``train`` always does, in a
traced graph; the others compile with ``run_eagerly=True`` (``eagerly()``), which runs the same
Python code (data streams, train step, callbacks, checkpoints, saving) op by op. The traced
DomainAdaptationModel step is also covered by tests/test_adaptation.py.
"""

from __future__ import annotations

import json
from contextlib import contextmanager

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtransfer.cli import main
from medtransfer.data.augment import make_augmenter
from medtransfer.data.manifest import build_manifest, targets
from medtransfer.data.pipeline import load_images
from medtransfer.errors import SpecError
from medtransfer.evaluation.sites import SITES_FILE, site_report
from medtransfer.models.adaptation import DomainAdaptationModel, GradientReversal
from medtransfer.models.build import compile_model
from medtransfer.models.saved import load_keras_model, load_run_model
from medtransfer.rundir import HISTORY_FILE, MANIFEST_FILE, RUN_FILE, SOURCE_MODEL_FILE
from medtransfer.spec import dump_spec, load_spec, spec_from_dict
from medtransfer.training import domain
from medtransfer.training import run as run_module
from medtransfer.training.checkpoint import load_checkpoint
from medtransfer.training.run import train
from medtransfer.training.schedule import find_backbone

from .test_resume import KillAfterEpoch, Killed

SOURCE, TARGET = "north", "south"
COUNTS = {"train": 8, "val": 4, "test": 4}  # per class and site


def write_sites(
    root,
    *,
    counts=COUNTS,
    target_gain=0.45,
    target_offset=0.45,
    prevalence=None,
    wrong_target_labels=True,
    seed=0,
):
    """Two sites of 32 px PNGs ('spot' images carry a bright square). ``prevalence`` (site ->
    share of 'spot') replaces the balanced classes; ``wrong_target_labels``: every target
    training image is labelled 'spot'."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in (SOURCE, TARGET):
        gain, offset = (1.0, 0.0) if site == SOURCE else (target_gain, target_offset)
        for split, per_class in counts.items():
            n = 2 * per_class
            spots = round(n * prevalence[site]) if prevalence else per_class
            for i in range(n):
                label = "spot" if i < spots else "plain"
                image = rng.integers(40, 90, (32, 32)).astype(np.float64)
                if label == "spot":
                    y, x = rng.integers(4, 18, 2)
                    image[y : y + 10, x : x + 10] = 230
                image = np.clip(image * gain + 255 * offset, 0, 255).astype(np.uint8)
                path = root / site / split / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image).save(path)
                wrong = wrong_target_labels and site == TARGET and split == "train"
                rows.append(
                    {
                        "path": path.relative_to(root).as_posix(),
                        "label": "spot" if wrong else label,
                        "patient_id": f"{site}-{split}-{i}",
                        "site": site,
                        "split": split,
                    }
                )
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv"


def make_spec(manifest, adaptation=None, **training):
    raw = {
        "name": "sites",
        "task": "binary",
        "classes": ["plain", "spot"],
        "data": {
            "format": "manifest",
            "path": str(manifest),
            "patient_column": "patient_id",
            "site_column": "site",
            "split_column": "split",
        },
        "image": {"size": [32, 32], "channels": 1},
        "model": {"backbone": "mobilenetv3small", "weights": "none", "dropout": 0.3},
        "training": {"epochs": 1, "batch_size": 8, "seed": 5, **training},
        "augmentation": {"preset": "none"},
    }
    if adaptation is not None:
        raw["domain_adaptation"] = adaptation
    return spec_from_dict(raw)


def adapting(method, **extra):
    return {"method": method, "source": [SOURCE], "target": [TARGET], **extra}


def _compile_eagerly(model, *args, **kwargs):
    compile_model(model, *args, **kwargs)
    model.run_eagerly = True
    return model


@contextmanager
def eagerly():
    """Runs train their models op by op (see the module docstring)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(run_module, "compile_model", _compile_eagerly)
        yield


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_sites(tmp_path_factory.mktemp("two_sites"))


# --- the spec -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"method": "coral", "source": [SOURCE]}, "needs both source and target"),
        ({"method": "dann", "target": [TARGET]}, "needs both source and target"),
        ({"method": "mmd", "source": ["a", "b"], "target": ["b"]}, r"\['b'\] are both source"),
        ({"method": "adabn", "source": ["a", "a"], "target": ["b"]}, "lists a site twice"),
        ({"method": "coral", "source": ["a"], "target": ["b"], "weight": -1}, "greater than"),
        ({"method": "fancy", "source": ["a"], "target": ["b"]}, "domain_adaptation.method"),
        ({"method": "none", "validation": "target"}, "validation: target needs target"),
        ({"method": "coral", "source": ["a"], "target": ["b"], "extra": 1}, "unknown field"),
    ],
)
def test_invalid_sections_are_refused_with_the_reason(manifest, section, message):
    with pytest.raises(SpecError, match=message):
        make_spec(manifest, section)


def test_sites_must_exist_and_tabular_and_siteless_data_are_refused(manifest, tmp_path):
    spec = make_spec(manifest, {"method": "coral", "source": [SOURCE], "target": ["west"]})
    with pytest.raises(SpecError, match=r"\['west'\] are not in the data"):
        domain.check_sites(spec, build_manifest(spec))
    raw = make_spec(manifest).model_dump(mode="json", exclude={"source_file"})
    raw["domain_adaptation"] = adapting("dann")
    with pytest.raises(SpecError, match="does not support tabular features"):
        spec_from_dict({**raw, "tabular": [{"name": "age", "type": "numeric"}]})
    del raw["data"]["site_column"]
    with pytest.raises(SpecError, match=r"set data\.site_column"):
        spec_from_dict(raw)


def test_section_defaults_round_trip_and_numeric_site_names(manifest, tmp_path):
    plain = make_spec(manifest)
    assert plain.domain_adaptation.method == "none" and not plain.domain_adaptation.active
    spec = make_spec(manifest, {"method": "mmd", "source": [1], "target": [2], "weight": 0.5})
    assert spec.domain_adaptation.source == ["1"] and spec.domain_adaptation.target == ["2"]
    (tmp_path / "spec.yaml").write_text(dump_spec(spec))
    assert dump_spec(load_spec(tmp_path / "spec.yaml")) == dump_spec(spec)


# --- the two streams ------------------------------------------------------------------------------


def test_only_source_labels_reach_the_loss_and_the_target_stream_is_seeded(manifest):
    spec = make_spec(manifest, adapting("coral")).with_overrides(augmentation={"preset": "light"})
    table = build_manifest(spec)
    labelled = domain.labelled_rows(spec, table)
    assert set(labelled["site"]) == {SOURCE} and set(
        domain.validation_rows(spec, table)["site"]
    ) == {SOURCE}
    source = labelled[labelled["split"] == "train"]
    train_x = load_images(source, (32, 32), 1, workers=0)
    train_y = targets(source, spec.classes)
    target_x = domain.load_target_images(spec, table, workers=0)
    assert len(target_x) == 2 * COUNTS["train"]
    steps = -(-len(train_x) // 8)

    def epoch(number):
        dataset, class_weight = domain.training_dataset(
            spec,
            train_x,
            train_y,
            target_x,
            epochs=range(number, number + 1),
            steps_per_epoch=steps,
            augment=make_augmenter(spec),
            class_weight={0: 1.0, 1: 3.0},
        )
        assert class_weight is None  # folded into the source part of each batch
        return [tuple(np.asarray(t) for t in flat) for flat in _flat(dataset)]

    first = epoch(0)
    assert len(first) == steps
    labels = np.concatenate([ys for _, ys, _, _ in first])
    weights = np.concatenate([w for _, _, w, _ in first])
    # every source image once per epoch, with its own label; no target label anywhere
    assert len(labels) == len(train_x)
    np.testing.assert_array_equal(labels.sum(axis=0), train_y.sum(axis=0))
    np.testing.assert_array_equal(weights, np.where(labels[:, 1] == 1, 3.0, 1.0))
    assert all(t.shape == (8, 32, 32, 1) for *_, t in first)
    again = epoch(0)
    for a, b in zip(first, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)  # the same batches, whenever they are made
    assert not np.array_equal(first[0][3], epoch(1)[0][3])  # another epoch, another draw


def _flat(dataset):
    for (images, labels, weights), target in dataset:
        yield images, labels, weights, target


def test_target_stream_cycles_a_small_target_set():
    images = np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
    dataset = domain.make_target_dataset(
        images, batch_size=4, seed=0, epochs=range(2), steps_per_epoch=2, classes=2
    )
    batches = [np.asarray(b).ravel() for b in dataset]
    assert len(batches) == 4 and all(len(b) == 4 for b in batches)
    per_epoch = [np.concatenate(batches[:2]), np.concatenate(batches[2:])]
    for drawn in per_epoch:  # 8 draws from 3 images: each image 2 or 3 times
        assert sorted(np.bincount(drawn.astype(int), minlength=3)) == [2, 3, 3]


def test_the_training_model_wraps_the_classifier_and_phases_find_its_backbone(manifest):
    from medtransfer.models.build import build_model

    spec = make_spec(manifest, adapting("dann"))
    classifier = build_model(spec)
    wrapped = domain.training_model(classifier, spec)
    assert isinstance(wrapped, DomainAdaptationModel)
    assert find_backbone(wrapped) is classifier.get_layer("backbone")
    images = np.random.default_rng(0).random((3, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(wrapped(images), classifier(images), atol=1e-6)
    assert domain.training_model(classifier, make_spec(manifest, adapting("adabn"))) is classifier


# --- training runs --------------------------------------------------------------------------------


def check_adapted_run(run, method):
    info = run.info.domain_adaptation
    assert info["method"] == method and info["labelled_sites"] == [SOURCE]
    assert info["validation"] == "source" and "no target labels" in info["best_epoch_chosen_on"]
    assert info["images"] == {
        "labelled_train": 2 * COUNTS["train"],
        "validation": 2 * COUNTS["val"],
        "target_train_unlabelled": 2 * COUNTS["train"],
    }
    stored = pd.read_csv(run.path / MANIFEST_FILE)
    assert set(stored["site"]) == {SOURCE, TARGET}  # the target's test images get evaluated
    history = pd.read_csv(run.path / HISTORY_FILE)
    aligned = "domain_loss" if method == "dann" else "alignment_loss"
    assert {"task_loss", aligned, "val_auc"} <= set(history.columns)
    assert np.isfinite(history[aligned]).all()
    assert any((run.path / "logs").rglob("*tfevents*"))
    model = load_run_model(run.path)  # safe_mode=True
    assert not isinstance(model, DomainAdaptationModel)
    assert not any(isinstance(layer, GradientReversal) for layer in _layers(model))
    assert [layer.name for layer in model.layers][-3:] == [
        "backbone",
        "head_dropout",
        "probabilities",
    ]
    probabilities = model.predict(np.full((2, 48, 40, 1), 0.4, np.float32), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def _layers(model):
    return model._flatten_layers(include_self=False, recursive=True)


def test_dann_trains_end_to_end_in_a_traced_graph(manifest, tmp_path):
    spec = make_spec(manifest, adapting("dann", weight=0.5), class_weight="balanced")
    run = train(spec, tmp_path / "dann", workers=0)
    check_adapted_run(run, "dann")
    checkpoint = load_checkpoint(run.path)  # the domain classifier trains, but is not saved
    assert len(checkpoint.model_values) > len(load_run_model(run.path).variables)


@pytest.mark.parametrize(
    "method",
    ["coral", pytest.param("mmd", marks=pytest.mark.slow)],  # one alignment by default
)
def test_alignment_methods_train_end_to_end(manifest, tmp_path, method):
    spec = make_spec(manifest, adapting(method))
    with eagerly():
        run = train(spec, tmp_path / method, workers=0)
    check_adapted_run(run, method)
    if method == "coral":  # the sites report reads a trained run's backbone too
        report = site_report(spec, None, model=run.path, workers=0, max_per_site=12)
        assert report.separability["features"] == f"the trained backbone of run {run.path}"
        assert 0.0 <= report.separability["auroc"] <= 1.0


@pytest.mark.slow  # two DANN runs (~50 s); test_cli resumes a SIGKILLed run to the same weights
def test_resumed_dann_run_matches_the_uninterrupted_one(manifest, tmp_path):
    spec = make_spec(manifest, adapting("dann"), epochs=2)
    with eagerly():
        reference = train(spec, tmp_path / "whole", workers=0)
        with pytest.raises(Killed):
            train(spec, tmp_path / "killed", workers=0, callbacks=[KillAfterEpoch(0)])
        assert not (tmp_path / "killed" / RUN_FILE).exists()
        resumed = train(None, tmp_path / "killed", resume=True, workers=0)
    got, want = load_checkpoint(resumed.path), load_checkpoint(reference.path)
    for a, b in zip(got.model_values, want.model_values, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got.optimizer_values, want.optimizer_values, strict=True):
        np.testing.assert_array_equal(a, b)
    assert resumed.info.best_epoch == reference.info.best_epoch


def test_adabn_changes_only_batchnorm_statistics(manifest, tmp_path):
    with eagerly():
        run = train(make_spec(manifest, adapting("adabn")), tmp_path / "adabn", workers=0)
    info = run.info.domain_adaptation
    assert info["method"] == "adabn" and info["adabn"]["target_images"] == 2 * COUNTS["train"]
    adapted = load_run_model(run)
    source = load_keras_model(run.path / SOURCE_MODEL_FILE)
    batchnorm = [x for x in _layers(adapted) if isinstance(x, keras.layers.BatchNormalization)]
    assert info["adabn"]["adapted_layers"] == len(batchnorm) > 0
    statistics = {id(v) for x in batchnorm for v in (x.moving_mean, x.moving_variance)}
    changed = unchanged = 0
    for after, before in zip(adapted.weights, source.weights, strict=True):
        same = np.array_equal(np.asarray(after), np.asarray(before))
        if id(after) in statistics:
            changed += not same
        else:
            assert same, after.path
            unchanged += 1
    assert changed >= len(batchnorm) and unchanged > 0


# --- medtransfer sites ---------------------------------------------------------------------------


def test_sites_reports_counts_prevalence_and_flags_a_planted_shortcut(tmp_path, capsys):
    data = write_sites(
        tmp_path / "data",
        counts={"train": 20, "val": 5, "test": 5},
        prevalence={SOURCE: 0.2, TARGET: 0.8},
        wrong_target_labels=False,
    )
    spec_file = tmp_path / "spec.yaml"
    raw = make_spec(data, adapting("coral")).model_dump(mode="json", exclude={"source_file"})
    spec_file.write_text(json.dumps(raw))  # JSON is YAML
    assert main(["sites", "--spec", str(spec_file), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / SITES_FILE).read_text())
    assert report["counts"][SOURCE] == {"train": 40, "val": 10, "test": 10, "total": 60}
    assert report["prevalence"][SOURCE]["spot"] == pytest.approx(0.2)
    assert report["prevalence"][TARGET]["spot"] == pytest.approx(0.8)
    test = report["prevalence_tests"][0]
    assert test["warning"] and test["p_value"] < 0.01 and test["max_difference"] > 0.1
    assert "WARNING: the prevalence of spot differs strongly" in printed
    assert report["intensity"][TARGET]["mean"] > report["intensity"][SOURCE]["mean"] + 0.1
    separability = report["separability"]
    assert separability["auroc"] > 0.9 and "RANDOM weights" in separability["features"]
    assert separability["source_vs_target"][f"{SOURCE} vs {TARGET}"] > 0.9
    assert (tmp_path / "out" / "sites_embedding.png").stat().st_size > 1000
    assert (tmp_path / "out" / "sites_intensity.png").stat().st_size > 1000


def test_sites_from_one_distribution_are_not_separable(tmp_path):
    data = write_sites(
        tmp_path / "data",
        counts={"train": 20, "val": 5, "test": 5},
        target_gain=1.0,
        target_offset=0.0,
        wrong_target_labels=False,
    )
    report = site_report(make_spec(data), None, workers=0)
    assert report.counts[TARGET]["total"] == 60
    assert report.prevalence[SOURCE]["spot"] == report.prevalence[TARGET]["spot"] == 0.5
    assert abs(report.separability["auroc"] - 0.5) < 0.15
    assert not report.warnings
