"""Model assembly: in-graph preprocessing matches each backbone's own preprocess_input, grey
images reach RGB backbones, weights come from local files, and offline ImageNet fails clearly."""

from __future__ import annotations

import urllib.error

import keras
import numpy as np
import pytest

from medtransfer.errors import WeightsUnavailableError
from medtransfer.models.backbones import BACKBONES, build_backbone
from medtransfer.models.build import build_model
from medtransfer.models.layers import BackbonePreprocessing, ChannelAdapter
from medtransfer.spec import spec_from_dict

from .conftest import SHARED_DATA

RNG = np.random.default_rng(0)


@pytest.mark.parametrize(
    ("mode", "reference"),
    [
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("tf", keras.applications.resnet_v2.preprocess_input),
    ],
)
def test_preprocessing_matches_keras_applications(mode, reference):
    x = RNG.random((2, 5, 7, 3), dtype=np.float32)
    ours = np.asarray(BackbonePreprocessing(mode)(x))
    np.testing.assert_allclose(ours, reference(x * 255.0), rtol=1e-5, atol=1e-4)


def test_raw255_leaves_normalisation_to_the_backbone():
    x = RNG.random((1, 4, 4, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(BackbonePreprocessing("raw255")(x)), x * 255, rtol=1e-6)


def test_channel_adapter_repeats_grey_and_averages_colour():
    grey = RNG.random((2, 3, 3, 1), dtype=np.float32)
    rgb = np.asarray(ChannelAdapter(3)(grey))
    assert rgb.shape == (2, 3, 3, 3)
    assert all(np.array_equal(rgb[..., c], grey[..., 0]) for c in range(3))
    colour = RNG.random((1, 3, 3, 3), dtype=np.float32)
    np.testing.assert_allclose(
        np.asarray(ChannelAdapter(1)(colour))[..., 0], colour.mean(-1), rtol=1e-6
    )
    assert ChannelAdapter.from_config(ChannelAdapter(1).get_config()).channels == 1


def tiny_spec(**model):
    return spec_from_dict(
        {
            "name": "tiny",
            "task": "multiclass",
            "classes": ["a", "b", "c"],
            "data": {"format": "npz", "path": str(SHARED_DATA / "medmnist" / "retinamnist.npz")},
            "image": {"size": [32, 32], "channels": 1},
            "model": {"backbone": "mobilenetv3small", "weights": "none", **model},
        }
    )


def test_model_takes_any_size_and_returns_probabilities(tmp_path):
    model = build_model(tiny_spec())
    for shape in ((2, 32, 32, 1), (3, 57, 41, 1)):
        p = np.asarray(model(RNG.random(shape, dtype=np.float32)))
        assert p.shape == (shape[0], 3)
        np.testing.assert_allclose(p.sum(1), 1, rtol=1e-5)
    assert model.output.name.startswith("probabilities") or model.layers[-1].name == "probabilities"


def test_saved_model_reloads_in_safe_mode_with_same_outputs(tmp_path):
    model = build_model(tiny_spec())
    x = RNG.random((2, 40, 40, 1), dtype=np.float32)
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(np.asarray(again(x)), np.asarray(model(x)), atol=1e-6)


def test_random_init_backbones_use_fast_batchnorm_statistics():
    model = build_model(tiny_spec())
    momenta = {
        layer.momentum
        for layer in model.get_layer("backbone").layers
        if isinstance(layer, keras.layers.BatchNormalization)
    }
    assert momenta == {0.9}


def test_local_weights_file_is_loaded(tmp_path):
    source = build_backbone("mobilenetv3small", "none", (32, 32, 3))
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    loaded = build_backbone("mobilenetv3small", str(path), (32, 32, 3))
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    fresh = build_backbone("mobilenetv3small", "none", (32, 32, 3))
    assert any(
        not np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(source.weights, fresh.weights, strict=True)
    )


def test_weights_file_for_another_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "other.weights.h5"
    build_backbone("mobilenetv3small", "none", (32, 32, 3)).save_weights(path)
    with pytest.raises(WeightsUnavailableError, match="does not fit EfficientNetB0"):
        build_backbone("efficientnetb0", str(path), (32, 32, 3))


def test_offline_imagenet_fails_fast_and_explains_the_local_file_route(tmp_path, monkeypatch):
    from keras.src.backend import config
    from keras.src.utils import file_utils

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path))  # no cached weights
    monkeypatch.setattr(file_utils, "urlretrieve", offline)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("resnet50", "imagenet", (32, 32, 3))
    message = str(info.value)
    assert "ResNet50" in message and "offline" in message
    assert "medtransfer weights download resnet50" in message and "--weights PATH" in message


def test_registry_has_the_promised_backbones():
    assert {"resnet50", "efficientnetb0", "densenet121"} <= set(BACKBONES)


def test_pipeline_resize_is_the_models_own_resize():
    """Training feeds pre-resized images; serving feeds full-size ones: same pixels either way."""
    from medtransfer.models.inputs import to_model_input

    resize = build_model(tiny_spec()).get_layer("resize")
    for shape in ((97, 61), (40, 120), (32, 32)):
        image = RNG.random(shape, dtype=np.float32)
        in_graph = np.asarray(resize(image[None, ..., None]))
        np.testing.assert_allclose(to_model_input([image], (32, 32), 1), in_graph, atol=1e-6)


def test_a_bare_call_is_inference_and_leaves_batchnorm_statistics_alone():
    """Keras' Resizing defaults to training=True, which as the first layer made ``model(x)`` run
    BatchNormalization in training mode and overwrite its moving averages."""
    model = build_model(tiny_spec())
    x = np.random.default_rng(0).random((4, 40, 40, 1)).astype("float32")
    statistics = [w.numpy().copy() for w in model.non_trainable_weights]
    bare = np.asarray(model(x))
    assert np.array_equal(bare, np.asarray(model(x, training=False)))
    assert all(
        np.array_equal(a, w.numpy())
        for a, w in zip(statistics, model.non_trainable_weights, strict=True)
    )
