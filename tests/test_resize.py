"""The NumPy resize decode workers use must be TensorFlow's antialiased bilinear resize: the
model's own ``Resizing`` layer runs TensorFlow's, and training, the cache and serving must see
the same pixels. Compared on random images of many shapes and on real decoded radiographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from medtransfer.io import load_image
from medtransfer.io.resize import axis_weights, model_pixels, resize
from medtransfer.models.inputs import resize_images

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
RNG = np.random.default_rng(7)
TOLERANCE = 2e-6  # float32 sums in another order; the cache's own bound is 7.7e-6


def tf_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return tf.image.resize(image[None], size, method="bilinear", antialias=True).numpy()[0]


@pytest.mark.parametrize(
    ("shape", "size"),
    [
        ((512, 512, 1), (224, 224)),  # down, square
        ((97, 61, 1), (32, 32)),  # down, odd and not square
        ((28, 28, 1), (224, 224)),  # up 8x (MedMNIST to a backbone)
        ((40, 120, 3), (64, 50)),  # up one axis, down the other, colour
        ((300, 301, 2), (299, 300)),  # barely down
        ((33, 17, 1), (33, 17)),  # same size
        ((7, 3, 1), (1, 1)),  # to one pixel
        ((1, 1, 1), (5, 4)),  # from one pixel
    ],
)
def test_numpy_resize_is_tensorflows(shape: tuple[int, ...], size: tuple[int, int]) -> None:
    image = RNG.random(shape, dtype=np.float32)
    ours = resize(image, size)
    assert ours.dtype == np.float32 and ours.shape == (*size, shape[-1])
    np.testing.assert_allclose(ours, tf_resize(image, size), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize(
    "name", ["RG1_J2KI.dcm", "NIH_CXR14_DX_NoFinding_1.3.6.1.4.1.11129.5.5.1105.dcm"]
)
def test_real_radiograph_resizes_as_the_model_does(name: str) -> None:
    pixels = load_image(CORPUS / name).pixels[..., None]
    assert min(pixels.shape[:2]) > 1000
    in_graph = resize_images(pixels[None], (224, 224)).numpy()[0]
    np.testing.assert_allclose(resize(pixels, (224, 224)), in_graph, rtol=0, atol=TOLERANCE)


def test_same_size_is_the_identity_and_weights_sum_to_one() -> None:
    image = RNG.random((20, 30, 1), dtype=np.float32)
    assert np.array_equal(resize(image, (20, 30)), image)
    for n_in, n_out in ((2500, 224), (28, 224), (5, 5)):
        weights = axis_weights(n_in, n_out).toarray()
        np.testing.assert_allclose(weights.sum(axis=1), 1, atol=1e-6)
        assert (weights >= 0).all()


@pytest.mark.parametrize(
    ("shape", "channels"), [((50, 60), 1), ((50, 60), 3), ((50, 60, 3), 1), ((50, 60, 3), 3)]
)
def test_model_pixels_match_channels_then_resize(shape: tuple[int, ...], channels: int) -> None:
    """Grey to three channels repeats the plane, colour to grey averages, as the model's input
    conversion always has; the grey plane is resized once and repeated, with the same values."""
    image = RNG.random(shape, dtype=np.float32)
    plane = image[..., None] if image.ndim == 2 else image
    if plane.shape[-1] != channels:
        plane = plane.mean(-1, keepdims=True) if channels == 1 else np.repeat(plane, 3, -1)
    expected = tf_resize(plane, (24, 20))
    np.testing.assert_allclose(model_pixels(image, (24, 20), channels), expected, atol=TOLERANCE)
