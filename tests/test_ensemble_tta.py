"""Ensembles, test-time augmentation and paired comparisons: exact combinations of the members'
outputs, run directories that evaluate and export like any run, and refusals that protect the
test split."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tensorflow as tf

from medtransfer.errors import RunError
from medtransfer.evaluation.compare import compare_reports
from medtransfer.evaluation.report import evaluate
from medtransfer.evaluation.stats import paired_delong
from medtransfer.models.saved import load_run_model
from medtransfer.models.tta import CentralZoom, MirrorLeftRight, tta_model
from medtransfer.rundir import SPEC_FILE, open_run
from medtransfer.spec import load_spec
from medtransfer.training.ensemble import create_ensemble, member_weights
from medtransfer.training.run import train

IMAGES = np.random.default_rng(5).random((6, 40, 40, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def members(tiny_run, tmp_path_factory):
    """tiny_run and a second seed on the same data and splits."""
    spec = load_spec(tiny_run / SPEC_FILE).with_overrides(training={"seed": 1})
    second = train(spec, tmp_path_factory.mktemp("seed1") / "run", workers=0)
    return [tiny_run, second.path]


def predict(run_dir, images=IMAGES):
    return np.asarray(load_run_model(run_dir)(images, training=False))


@pytest.mark.parametrize("method", ["mean", "weighted", "vote"])
def test_ensemble_combines_its_members_exactly(members, method, tmp_path):
    out = create_ensemble(members, tmp_path / method, method=method)
    got = predict(out)
    each = np.stack([predict(m) for m in members])
    if method == "mean":
        expected = each.mean(0)
    elif method == "weighted":
        aucs = [open_run(m).info.best_val_auroc for m in members]
        w = np.array([max(a - 0.5, 1e-6) for a in aucs])
        expected = np.tensordot(w / w.sum(), each, axes=1)
        assert json.loads((out / "run.json").read_text())["ensemble"]["weights"] == pytest.approx(
            list(w / w.sum())
        )
    else:
        expected = np.eye(2)[each.argmax(-1)].mean(0)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_member_weights_follow_validation_auroc_above_chance():
    assert member_weights([0.9, 0.7, 0.5]) == pytest.approx([2 / 3, 1 / 3, 1e-6 / 0.6], rel=1e-5)


@pytest.mark.slow  # the CLI end to end on an ensemble (~50 s); combining is tested exactly above
def test_ensemble_run_evaluates_exports_and_compares_like_any_run(members, tmp_path):
    from medtransfer.export import export_model

    spec = load_spec(members[0] / SPEC_FILE)
    ensemble = create_ensemble(members, tmp_path / "ens", method="mean")
    reports = {
        name: evaluate(path, spec, split="test", out_dir=tmp_path / f"r_{name}")
        for name, path in (("ensemble", ensemble), ("member", members[0]))
    }
    exported = export_model(ensemble, tmp_path / "models" / "ens" / "1")
    served = tf.saved_model.load(str(exported)).signatures["serving_default"]
    np.testing.assert_allclose(
        served(image=tf.constant(IMAGES))["probabilities"].numpy(), predict(ensemble), atol=1e-5
    )
    result = compare_reports(reports["ensemble"].out_dir, reports["member"].out_dir)
    a, b = (reports[k].predictions for k in ("ensemble", "member"))
    assert result["n_common"] == len(a) == len(b)
    reference = paired_delong(a["y_spot"].to_numpy().astype(int), a["prob_spot"], b["prob_spot"])
    got = result["classes"]["spot"]
    assert got["difference"] == pytest.approx(reference.difference, abs=1e-12)
    assert got["p_value"] == pytest.approx(reference.p_value, abs=1e-12)
    itself = compare_reports(reports["member"].out_dir, reports["member"].out_dir)
    assert (
        itself["classes"]["spot"]["difference"] == 0 and itself["classes"]["spot"]["p_value"] == 1
    )


def edited_copy(run_dir, target, **changes):
    shutil.copytree(run_dir, target)
    info = json.loads((target / "run.json").read_text())
    (target / "run.json").write_text(json.dumps({**info, **changes}))
    return target


def test_ensemble_refuses_members_with_other_data_splits_or_classes(members, tmp_path):
    other_data = edited_copy(members[1], tmp_path / "data", data_fingerprint="0123456789abcdef")
    with pytest.raises(RunError, match="differ in data_fingerprint"):
        create_ensemble([members[0], other_data], tmp_path / "bad")
    other_classes = edited_copy(members[1], tmp_path / "classes", classes=["a", "b"])
    with pytest.raises(RunError, match="differ in classes"):
        create_ensemble([members[0], other_classes], tmp_path / "bad")
    resplit = edited_copy(members[1], tmp_path / "split")
    manifest = (resplit / "manifest.csv").read_text().replace(",test,", ",train,", 1)
    (resplit / "manifest.csv").write_text(manifest)
    with pytest.raises(RunError, match="split the data differently"):
        create_ensemble([members[0], resplit], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_tta_views_are_exact():
    x = tf.constant(IMAGES)
    np.testing.assert_array_equal(MirrorLeftRight()(x).numpy(), IMAGES[:, :, ::-1])
    constant = tf.fill((2, 40, 30, 1), 0.25)
    np.testing.assert_allclose(CentralZoom(0.9)(constant).numpy(), 0.25, atol=1e-6)
    zoomed = CentralZoom(0.5)(tf.constant(np.pad(np.ones((1, 20, 20, 1)), [(0, 0), (10, 10),
                                                 (10, 10), (0, 0)]), tf.float32))  # fmt: skip
    assert zoomed.shape == (1, 40, 40, 1) and float(tf.reduce_min(zoomed)) > 0.99  # centre fills


@pytest.mark.parametrize(("mirror", "views"), [(True, 4), (False, 2)])
def test_tta_model_averages_the_model_over_its_views(tiny_run, mirror, views):
    model = load_run_model(tiny_run)
    wrapped = tta_model(model, mirror=mirror)
    assert len(wrapped.get_layer("probabilities").member_weights) == views
    x = tf.constant(IMAGES)
    zoom = CentralZoom()(x)
    parts = [x, zoom] + ([MirrorLeftRight()(x), MirrorLeftRight()(zoom)] if mirror else [])
    expected = np.mean([model(v, training=False).numpy() for v in parts], axis=0)
    np.testing.assert_allclose(wrapped(x, training=False).numpy(), expected, atol=1e-6)


def test_tta_export_serves_the_tta_model(tiny_run, tmp_path):
    from medtransfer.export import export_model
    from medtransfer.predictor import load_predictor

    exported = export_model(tiny_run, tmp_path / "tta" / "1", tta=True)
    served = tf.saved_model.load(str(exported)).signatures["serving_default"]
    keras_tta = load_predictor(tiny_run, tta=True).model
    np.testing.assert_allclose(
        served(image=tf.constant(IMAGES))["probabilities"].numpy(),
        keras_tta(IMAGES, training=False).numpy(),
        atol=1e-5,
    )
    assert "Test-time augmentation" in (exported / "model_card.md").read_text()
