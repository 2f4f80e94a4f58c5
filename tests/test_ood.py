"""The OOD score: Mahalanobis distance of the pooled backbone features to the training images',
read as a percentile of the validation images' scores."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from medtransfer.models import ood
from medtransfer.models.build import build_model
from medtransfer.predictor import KerasPredictor, ModelInfo
from medtransfer.scope import percentiles

from .test_models import tiny_spec

RNG = np.random.default_rng(3)


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


@pytest.fixture(scope="module")
def model_and_reference() -> tuple[keras.Model, dict]:
    model = build_model(tiny_spec())
    train = RNG.random((40, 32, 32, 1), dtype=np.float32)
    val = RNG.random((12, 32, 32, 1), dtype=np.float32)
    return model, ood.reference(model, train, val, batch_size=16, seed=0)


def test_reference_of_a_model(model_and_reference) -> None:
    model, reference = model_and_reference
    dim = int(ood.pooled_features(model).shape[-1])
    assert reference["mean"].shape == (dim,) and reference["precision"].shape == (dim, dim)
    scores = reference["validation_scores"]
    assert scores.shape == (12,) and np.all(np.diff(scores) >= 0) and np.all(scores > 0)


def test_scores_come_from_the_same_pass_and_leave_probabilities_alone(model_and_reference) -> None:
    model, reference = model_and_reference
    info = ModelInfo("tiny", "multiclass", ["a", "b", "c"], None, (32, 32), 1, "dicom", "first")
    plain = KerasPredictor(model, info)
    scored = KerasPredictor(model, info, ood_reference=reference)
    images = [RNG.random((32, 32), dtype=np.float32) for _ in range(5)]
    probs, scores = scored.predict_with_ood(images)
    np.testing.assert_allclose(probs, plain.predict(images), atol=1e-6)
    assert plain.predict_with_ood(images)[1] is None
    features = keras.Model(model.input, ood.pooled_features(model))
    x = np.stack(images)[..., None]
    f = np.asarray(features(x, training=False), np.float64) - reference["mean"]
    expected = np.sqrt(np.einsum("nd,de,ne->n", f, reference["precision"], f))
    np.testing.assert_allclose(scores, expected, rtol=1e-3)
    np.testing.assert_array_equal(scored.ood_validation, reference["validation_scores"])
    # an image unlike any training image lies further out than the validation images
    far = np.full((32, 32), 50.0, np.float32)
    assert scored.predict_with_ood([far])[1][0] > reference["validation_scores"].max()
