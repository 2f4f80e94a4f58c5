"""The OOD score: the sum over the backbone's stages of the Mahalanobis distance of the
spatially averaged features to the training images', read as a percentile of the validation
images' scores."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medtransfer.models import ood
from medtransfer.models.backbones import build_backbone
from medtransfer.models.build import build_model
from medtransfer.predictor import KerasPredictor, ModelInfo
from medtransfer.scope import percentiles

from .test_models import tiny_spec

RNG = np.random.default_rng(3)
VALIDATION = RNG.random((12, 32, 32, 1), dtype=np.float32)


def test_distance_is_the_mahalanobis_formula() -> None:
    features = RNG.normal(size=(7, 5)).astype(np.float32)
    mean = RNG.normal(size=5)
    a = RNG.normal(size=(5, 5))
    precision = a @ a.T + np.eye(5)
    layer = ood.FeatureDistance(5)
    layer.set_reference(mean, precision)
    expected = np.sqrt(np.einsum("nd,de,ne->n", features - mean, precision, features - mean))
    np.testing.assert_allclose(np.asarray(layer(features)), expected, rtol=1e-5)
    assert layer.get_config()["dim"] == 5


def test_reference_is_invertible_with_fewer_images_than_features() -> None:
    """A small site's training split: 20 images, 64 features. Plain covariance is singular."""
    features = RNG.normal(size=(20, 64))
    mean, precision = ood.fit_reference(features)
    np.testing.assert_allclose(mean, features.mean(0))
    assert np.all(np.isfinite(precision)) and np.allclose(precision, precision.T)
    assert np.linalg.eigvalsh(precision).min() > 0


def test_percentiles_against_the_validation_scores() -> None:
    reference = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(
        percentiles(np.array([0.5, 2.0, 2.5, 9.0]), reference), [0, 50, 50, 100]
    )
    assert np.isnan(percentiles(np.array([1.0]), np.array([]))).all()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet50", [f"conv{s}_block{b}_out" for s, b in ((2, 3), (3, 4), (4, 6), (5, 3))]),
        (
            "densenet121",
            [*(f"conv{s}_block{b}_concat" for s, b in ((2, 6), (3, 12), (4, 24))), "relu"],
        ),
        ("efficientnetb0", ["block2b_add", "block3b_add", "block5c_add", "top_activation"]),
    ],
)
def test_stages_end_where_the_resolution_halves(name, expected) -> None:
    """One tap per resolution from a quarter of the input down (64 px: 16, 8, 4, 2), at the
    last layer before the next halving: not the stem, not a layer inside a block."""
    backbone = build_backbone(name, "none", (64, 64, 3))
    assert ood.stage_layers(backbone, name) == expected
    sizes = [backbone.get_layer(tap).output.shape[1] for tap in expected]
    assert sizes == [16, 8, 4, 2]


def test_squeeze_and_excitation_maps_are_no_stage() -> None:
    """MobileNetV3's SE branches pool to 1x1 maps inside every block; only the main path's
    last map at each resolution is a stage."""
    backbone = build_backbone("mobilenetv3small", "none", (64, 64, 3))
    taps = ood.stage_layers(backbone, "mobilenetv3small")
    assert [backbone.get_layer(tap).output.shape[1] for tap in taps] == [16, 8, 4, 2]
    assert not any("squeeze" in tap or "reshape" in tap for tap in taps), taps


@pytest.fixture(scope="module")
def model_and_reference() -> tuple[keras.Model, dict]:
    model = build_model(tiny_spec())
    train = RNG.random((40, 32, 32, 1), dtype=np.float32)
    reference = ood.reference(
        model, train, VALIDATION, backbone="mobilenetv3small", batch_size=16, seed=0
    )
    return model, reference


def _stage_features(model: keras.Model, taps, images: np.ndarray) -> list[np.ndarray]:
    """By hand: the preprocessed images through the backbone alone, each tap averaged."""
    front = keras.Model(model.input, model.get_layer("backbone_preprocessing").output)
    backbone = model.get_layer("backbone")
    maps = keras.Model(backbone.input, [backbone.get_layer(str(t)).output for t in taps])
    out = maps(front(images, training=False), training=False)
    return [np.asarray(m, np.float64).mean(axis=(1, 2)) for m in out]


def test_reference_of_a_model(model_and_reference) -> None:
    model, reference = model_and_reference
    taps = list(reference["taps"])
    assert taps == ood.stage_layers(model.get_layer("backbone"), "mobilenetv3small")
    for i, tap in enumerate(taps):
        dim = model.get_layer("backbone").get_layer(str(tap)).output.shape[-1]
        assert reference[f"mean_{i}"].shape == (dim,)
        assert reference[f"precision_{i}"].shape == (dim, dim)
    scores = reference["validation_scores"]
    assert scores.shape == (12,) and np.all(np.diff(scores) >= 0) and np.all(scores > 0)
    # each stage is scaled so the validation images' distances average 1 there
    assert np.mean(scores) == pytest.approx(len(taps), rel=1e-4)


def test_scores_come_from_the_same_pass_and_leave_probabilities_alone(model_and_reference) -> None:
    model, reference = model_and_reference
    info = ModelInfo("tiny", "multiclass", ["a", "b", "c"], None, (32, 32), 1, "dicom", "first")
    plain = KerasPredictor(model, info)
    scored = KerasPredictor(model, info, ood_reference=reference)
    images = [RNG.random((32, 32), dtype=np.float32) for _ in range(5)]
    probs, scores = scored.predict_with_ood(images)
    np.testing.assert_allclose(probs, plain.predict(images), atol=1e-6)
    assert plain.predict_with_ood(images)[1] is None
    expected = np.zeros(len(images))
    x = np.stack(images)[..., None]
    for i, features in enumerate(_stage_features(model, reference["taps"], x)):
        centred = features - reference[f"mean_{i}"]
        expected += np.sqrt(np.einsum("nd,de,ne->n", centred, reference[f"precision_{i}"], centred))
    np.testing.assert_allclose(scores, expected, rtol=1e-3)
    np.testing.assert_array_equal(scored.ood_validation, reference["validation_scores"])
    # the reference's validation scores are what the scoring graph gives those images
    graph = np.sort(scored.predict_with_ood(list(VALIDATION[..., 0]))[1])
    np.testing.assert_allclose(graph, reference["validation_scores"], rtol=1e-4)
    # an image unlike any training image lies further out than the validation images
    far = np.full((32, 32), 50.0, np.float32)
    assert scored.predict_with_ood([far])[1][0] > reference["validation_scores"].max()


def test_a_reference_from_before_stages_scores_the_head_input(model_and_reference) -> None:
    """Runs and exports whose reference is one mean and precision of the head's input (as
    recorded before stages were tapped) keep their OOD scores."""
    model, _ = model_and_reference
    features = keras.Model(model.input, ood.pooled_features(model))
    train = RNG.random((30, 32, 32, 1), dtype=np.float32)
    mean, precision = ood.fit_reference(np.asarray(features(train, training=False)))
    legacy = {"mean": mean, "precision": precision}
    x = RNG.random((4, 32, 32, 1), dtype=np.float32)
    out = ood.with_ood_score(model, legacy)(x, training=False)
    centred = np.asarray(features(x, training=False), np.float64) - mean
    expected = np.sqrt(np.einsum("nd,de,ne->n", centred, precision, centred))
    np.testing.assert_allclose(np.asarray(out["ood_score"]), expected, rtol=1e-3)
    np.testing.assert_allclose(
        np.asarray(out["probabilities"]), np.asarray(model(x, training=False)), atol=1e-6
    )
