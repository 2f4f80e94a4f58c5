"""Unknown multilabel labels (empty cell or -1) are NaN targets that the loss, the training
metrics and the evaluation metrics all skip, label by label."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from medtransfer.data.manifest import build_manifest, targets
from medtransfer.errors import SpecError
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.models.build import build_model, compile_model
from medtransfer.models.losses import MaskedAUC, MaskedBinaryAccuracy, MaskedMultilabelLoss
from medtransfer.spec import spec_from_dict

from .test_training_options import spec_with

RNG = np.random.default_rng(7)
Y = RNG.integers(0, 2, (64, 3)).astype(np.float32)
P = RNG.uniform(0.01, 0.99, (64, 3)).astype(np.float32)
UNKNOWN = RNG.random((64, 3)) < 0.3
Y_NAN = np.where(UNKNOWN, np.nan, Y).astype(np.float32)


@pytest.mark.parametrize("gamma, smoothing", [(0.0, 0.0), (0.0, 0.1), (2.0, 0.0), (2.0, 0.1)])
def test_with_every_label_known_it_is_keras_binary_loss(gamma, smoothing):
    masked = MaskedMultilabelLoss(gamma=gamma, label_smoothing=smoothing)
    reference = (
        keras.losses.BinaryFocalCrossentropy(gamma=gamma, label_smoothing=smoothing)
        if gamma
        else keras.losses.BinaryCrossentropy(label_smoothing=smoothing)
    )
    assert float(masked(Y, P)) == pytest.approx(float(reference(Y, P)), rel=1e-5)


def test_unknown_labels_add_nothing_to_the_loss():
    bce = -(Y * np.log(P) + (1 - Y) * np.log(1 - P))
    known = ~UNKNOWN
    per_image = np.where(known, bce, 0).sum(1) / np.maximum(known.sum(1), 1)
    assert float(MaskedMultilabelLoss()(Y_NAN, P)) == pytest.approx(per_image.mean(), rel=1e-5)
    nothing_known = np.full((2, 3), np.nan, np.float32)
    assert float(MaskedMultilabelLoss()(nothing_known, P[:2])) == 0.0


def test_masked_auc_is_the_per_label_auc_of_the_known_labels():
    metric = MaskedAUC(multi_label=True, num_labels=3)
    metric.update_state(Y_NAN, P)
    per_label = []
    for k in range(3):
        single = keras.metrics.AUC()
        known = ~UNKNOWN[:, k]
        single.update_state(Y[known, k], P[known, k])
        per_label.append(float(single.result()))
        assert per_label[-1] == pytest.approx(roc_auc_score(Y[known, k], P[known, k]), abs=0.01)
    assert float(metric.result()) == pytest.approx(np.mean(per_label), abs=1e-6)


def test_masked_accuracy_counts_known_labels_only():
    metric = MaskedBinaryAccuracy()
    metric.update_state(Y_NAN, P)
    expected = ((P > 0.5) == (Y > 0.5))[~UNKNOWN].mean()
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


def test_evaluation_metrics_skip_unknown_labels():
    metrics = compute_metrics(Y_NAN, P, ["a", "b", "c"], "multilabel")
    for k, name in enumerate("abc"):
        known = ~UNKNOWN[:, k]
        want = roc_auc_score(Y[known, k], P[known, k])
        assert metrics["auroc"]["per_class"][name] == pytest.approx(want, abs=1e-12)
        assert metrics["unknown_labels"][name] == int(UNKNOWN[:, k].sum())
        assert metrics["prevalence"][name] == pytest.approx(Y[known, k].mean())


def csv_spec(tmp_path, cells: list[tuple[str, str]]):
    from PIL import Image

    rows = []
    for i, (a, b) in enumerate(cells):
        Image.fromarray(np.full((8, 8), 10 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "effusion": a, "nodule": b, "patient": f"p{i}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return spec_from_dict(
        {
            "name": "unknowns",
            "task": "multilabel",
            "classes": ["effusion", "nodule"],
            "data": {
                "format": "manifest",
                "path": str(tmp_path / "labels.csv"),
                "image_column": "image",
                "label_columns": ["effusion", "nodule"],
                "patient_column": "patient",
            },
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": "none"},
        }
    )


def test_manifest_reads_empty_cells_and_minus_one_as_unknown(tmp_path):
    spec = csv_spec(tmp_path, [("1", ""), ("0", "-1"), (" -1 ", "1"), ("0", "0")])
    manifest = build_manifest(spec).sort_values("path")
    np.testing.assert_array_equal(
        targets(manifest, spec.classes),
        np.array([[1, np.nan], [0, np.nan], [np.nan, 1], [0, 0]], np.float32),
    )


def test_other_values_are_still_refused(tmp_path):
    with pytest.raises(SpecError, match="0, 1, or \\(unknown\\) an empty cell or -1"):
        build_manifest(csv_spec(tmp_path, [("1", "2"), ("0", "1")]))


def test_unknown_labels_get_no_gradient():
    import tensorflow as tf

    p = tf.Variable(P)
    with tf.GradientTape() as tape:
        loss = MaskedMultilabelLoss(gamma=2.0)(Y_NAN, p)
    gradient = tape.gradient(loss, p).numpy()
    assert np.all(gradient[UNKNOWN] == 0)
    assert np.all(gradient[~UNKNOWN] != 0)


def test_a_model_trains_on_partly_unknown_labels():
    spec = spec_with("multilabel", ("a", "b", "c"))
    model = compile_model(build_model(spec), spec, steps_per_epoch=4)
    model.run_eagerly = True  # two steps do not repay graph tracing
    before = [w.numpy().copy() for w in model.trainable_weights]
    images = RNG.uniform(0, 1, (32, 32, 32, 1)).astype(np.float32)
    history = model.fit(images, Y_NAN[:32], batch_size=16, epochs=1, verbose=0)
    for name in ("loss", "auc", "accuracy"):
        assert all(np.isfinite(history.history[name])), (name, history.history[name])
    after = model.trainable_weights
    assert all(np.isfinite(w.numpy()).all() for w in after)
    assert any((b != a.numpy()).any() for b, a in zip(before, after, strict=True))
