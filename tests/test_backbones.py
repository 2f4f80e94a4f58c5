"""The backbone registry: every entry builds from grey images and trains; each family is
normalised exactly once (our in-graph layer or the network's own, never both); the block
partition behind partial unfreezing covers every layer once; weights files round-trip; the CLI
lists the registry.

SLOW backbones run only under ``make test-all`` (about two more minutes); every family keeps at
least one member in ``make test``. Training steps run eagerly: tracing a train step as a graph
costs 10-35 s per architecture on CPU and tests nothing of ours.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from medtransfer.models.backbones import (
    BACKBONES,
    backbone_blocks,
    build_backbone,
    get_backbone,
    unfreeze_top,
)
from medtransfer.models.build import build_model, compile_model
from medtransfer.models.layers import BackbonePreprocessing
from medtransfer.spec import spec_from_dict

from .conftest import SHARED_DATA

RNG = np.random.default_rng(0)
SIZE = 32  # the Keras minimum for every registered family

# The largest backbones, and the deeper twins of families a smaller member already covers.
SLOW = {
    "resnet101",
    "resnet152",
    *(f"efficientnetb{k}" for k in range(2, 8)),
    *(f"efficientnetv2{k}" for k in ("b2", "b3", "s", "m", "l")),
    "convnextsmall",
}

# Stem + blocks, from the published architectures (not from our patterns): ResNet stage depths,
# DenseNet dense layers + 3 transitions, EfficientNet repeats scaled by ceil(depth coefficient),
# ConvNeXt stage depths + 3 downsampling steps, MobileNetV3 inverted residuals.
EXPECTED_BLOCKS = {
    "resnet50": 1 + 3 + 4 + 6 + 3,
    "resnet101": 1 + 3 + 4 + 23 + 3,
    "resnet152": 1 + 3 + 8 + 36 + 3,
    "resnet50v2": 1 + 3 + 4 + 6 + 3,
    "densenet121": 1 + 6 + 12 + 24 + 16 + 3,
    "efficientnetb0": 1 + 16,
    "efficientnetb1": 1 + 23,
    "efficientnetb2": 1 + 23,
    "efficientnetb3": 1 + 26,
    "efficientnetb4": 1 + 32,
    "efficientnetb5": 1 + 39,
    "efficientnetb6": 1 + 45,
    "efficientnetb7": 1 + 55,
    "efficientnetv2b0": 1 + 21,
    "efficientnetv2b1": 1 + 27,
    "efficientnetv2b2": 1 + 28,
    "efficientnetv2b3": 1 + 32,
    "efficientnetv2s": 1 + 40,
    "efficientnetv2m": 1 + 57,
    "efficientnetv2l": 1 + 79,
    "convnexttiny": 1 + 3 + 3 + 9 + 3 + 3,
    "convnextsmall": 1 + 3 + 3 + 27 + 3 + 3,
    "mobilenetv3small": 1 + 11,
    "mobilenetv3large": 1 + 15,
}

# What the network's own first layers turn 0..255 input into (keras/src/applications sources):
# EfficientNetV2-B* and ConvNeXt apply ImageNet mean/std; MobileNetV3 maps to [-1, 1];
# EfficientNetV2-S/M/L use the original V2 recipe x / 128 - 1.
NORMALISES_INSIDE = {
    "efficientnetv2b0": BackbonePreprocessing("torch"),
    "efficientnetv2s": lambda x: x * 255.0 / 128.0 - 1.0,
    "convnexttiny": BackbonePreprocessing("torch"),
    "mobilenetv3small": BackbonePreprocessing("tf"),
}


def keras_preprocess_input(name: str):
    """``keras.applications.<family>.preprocess_input`` for a registered backbone."""
    constructor = getattr(keras.applications, get_backbone(name).constructor)
    return importlib.import_module(constructor.__module__).preprocess_input


def own_normalisation(backbone: keras.Model, images: np.ndarray) -> np.ndarray:
    """Run the backbone's leading preprocessing layers (Rescaling, Normalization) only."""
    x = images
    for layer in backbone.layers[1:]:
        if not isinstance(layer, keras.layers.Rescaling | keras.layers.Normalization):
            break
        x = layer(x)
    return np.asarray(x)


def test_registry_matches_keras_preprocess_input_for_every_entry():
    """No build needed: our mode reproduces Keras's function, or Keras's function is the
    identity because the network normalises inside (then we only scale to 0..255)."""
    x = RNG.random((2, 5, 7, 3), dtype=np.float32)
    for name, entry in BACKBONES.items():
        reference = np.asarray(keras_preprocess_input(name)(x * 255.0))
        ours = np.asarray(BackbonePreprocessing(entry.preprocessing)(x))
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-4, err_msg=name)
        assert (entry.preprocessing == "raw255") == np.array_equal(reference, x * 255.0), name


@pytest.mark.parametrize("name", sorted(NORMALISES_INSIDE))
def test_self_normalising_backbones_see_inputs_normalised_exactly_once(name):
    backbone = build_backbone(name, "none", (SIZE, SIZE, 3))
    x = RNG.random((2, SIZE, SIZE, 3), dtype=np.float32)
    seen = own_normalisation(backbone, np.asarray(BackbonePreprocessing("raw255")(x)))
    expected = np.asarray(NORMALISES_INSIDE[name](x))
    np.testing.assert_allclose(seen, expected, rtol=1e-5, atol=1e-5)


def test_efficientnet_imagenet_weights_file_gets_the_keras_imagenet_input_scaling(tmp_path):
    """EfficientNetB*(weights='imagenet') rescales after its Normalization; a local copy of the
    ImageNet file must give the same stem input, and a random-init file must not be rescaled."""
    from keras.src.applications.efficientnet import IMAGENET_STDDEV_RGB

    source = build_backbone("efficientnetb0", "none", (SIZE, SIZE, 3))
    random_init = tmp_path / "random.weights.h5"
    source.save_weights(random_init)
    mean, variance = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # as in the ImageNet file
    norm = next(layer for layer in source.layers if isinstance(layer, keras.layers.Normalization))
    norm.weights[0].assign(mean)
    norm.weights[1].assign(variance)
    imagenet_like = tmp_path / "imagenet.weights.h5"
    source.save_weights(imagenet_like)

    x = RNG.random((2, SIZE, SIZE, 3), dtype=np.float32)
    loaded = build_backbone("efficientnetb0", str(imagenet_like), (SIZE, SIZE, 3))
    keras_imagenet = (x - mean) / np.sqrt(variance) / np.sqrt(IMAGENET_STDDEV_RGB)
    np.testing.assert_allclose(own_normalisation(loaded, x * 255), keras_imagenet, atol=1e-5)
    plain = build_backbone("efficientnetb0", str(random_init), (SIZE, SIZE, 3))
    np.testing.assert_allclose(own_normalisation(plain, x * 255), x, atol=1e-6)
    assert len(plain.layers) == len(source.layers)


def grey_spec(name: str):
    return spec_from_dict(
        {
            "name": "grey",
            "task": "multiclass",
            "classes": ["a", "b", "c"],
            "data": {"format": "npz", "path": str(SHARED_DATA / "medmnist" / "retinamnist.npz")},
            "image": {"size": [SIZE, SIZE], "channels": 1},
            "model": {"backbone": name, "weights": "none"},
        }
    )


@pytest.fixture(
    scope="module",
    params=[pytest.param(n, marks=[pytest.mark.slow] if n in SLOW else []) for n in BACKBONES],
)
def built(request):
    """One full 1-channel model per backbone, shared by the tests below (pytest groups them)."""
    model = build_model(grey_spec(request.param))
    yield request.param, model
    keras.backend.clear_session()


def test_builds_from_grey_images_and_trains_one_step(built):
    name, model = built
    compile_model(model, grey_spec(name), steps_per_epoch=1)
    model.run_eagerly = True
    backbone = model.get_layer("backbone")
    before = [np.asarray(w) for w in backbone.trainable_weights]
    x = RNG.random((2, 45, 37, 1), dtype=np.float32)  # any size, one channel
    logs = model.train_on_batch(x, np.eye(3, dtype=np.float32)[[0, 2]], return_dict=True)
    assert np.isfinite(logs["loss"])
    after = [np.asarray(w) for w in backbone.trainable_weights]
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_in_graph_preprocessing_then_backbone_equals_keras_recipe(built):
    name, model = built
    backbone = model.get_layer("backbone")
    x = RNG.random((2, SIZE, SIZE, 3), dtype=np.float32)
    ours = backbone(model.get_layer("backbone_preprocessing")(x))
    keras_way = backbone(keras_preprocess_input(name)(x * 255.0))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(keras_way), rtol=1e-4, atol=1e-4)


def test_parameter_count_matches_the_registry(built):
    name, model = built
    assert model.get_layer("backbone").count_params() == get_backbone(name).params


def test_blocks_cover_every_layer_exactly_once(built):
    name, model = built
    backbone = model.get_layer("backbone")
    blocks = backbone_blocks(backbone, name)
    assert len(blocks) == EXPECTED_BLOCKS[name]
    members = [id(layer) for block in blocks for layer in block]
    assert sorted(members) == sorted(id(layer) for layer in backbone.layers)
    assert blocks[0][0] is backbone.layers[0] and blocks[-1][-1] is backbone.layers[-1]
    assert all(any(layer.trainable_weights for layer in block) for block in blocks[1:])


def test_unfreeze_top_trains_only_top_blocks_and_never_batchnorm(built):
    name, model = built
    backbone = model.get_layer("backbone")
    blocks = backbone_blocks(backbone, name)
    for n_blocks, expected in ((2, 2), (2.0, 2), (0.5, round(len(blocks) / 2)), (0, 0)):
        assert unfreeze_top(backbone, name, n_blocks) == expected
        for index, block in enumerate(blocks):
            for layer in block:
                is_bn = isinstance(layer, keras.layers.BatchNormalization)
                assert layer.trainable == (index >= len(blocks) - expected and not is_bn), (
                    f"{layer.name} in block {index}"
                )
    assert not backbone.trainable_weights
    unfreeze_top(backbone, name, 1)
    assert backbone.trainable_weights
    assert all(
        not layer.trainable
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def test_unfreeze_top_can_let_the_top_blocks_batchnorm_train(built):
    name, model = built
    backbone = model.get_layer("backbone")
    blocks = backbone_blocks(backbone, name)
    unfreeze_top(backbone, name, 2, train_batchnorm=True)
    for index, block in enumerate(blocks):
        for layer in block:
            if isinstance(layer, keras.layers.BatchNormalization):
                assert layer.trainable == (index >= len(blocks) - 2), layer.name


@pytest.mark.parametrize("bad", [-1, 2.5, True])
def test_unfreeze_top_rejects_counts_it_cannot_mean(bad):
    backbone = build_backbone("mobilenetv3small", "none", (SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"n_blocks|whole"):
        unfreeze_top(backbone, "mobilenetv3small", bad)


def test_parameter_count_does_not_depend_on_input_size():
    """The registry's counts are for the default size; the tests above count at 32 px."""
    entry = get_backbone("mobilenetv3small")
    size = entry.default_size
    assert build_backbone(entry.name, "none", (size, size, 3)).count_params() == entry.params


@pytest.mark.parametrize("name", ["resnet50v2", "convnexttiny"])
def test_weights_file_round_trips_into_a_fresh_build(name, tmp_path):
    source = build_backbone(name, "none", (SIZE, SIZE, 3))
    path = tmp_path / f"{name}.weights.h5"
    source.save_weights(path)
    loaded = build_backbone(name, str(path), (SIZE, SIZE, 3))
    for a, b in zip(source.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cli_lists_every_backbone():
    cli = Path(sys.executable).parent / "medtransfer"
    done = subprocess.run([str(cli), "backbones"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert listed == set(BACKBONES)
    assert "117,746,848" in done.stdout and "600x600" in done.stdout
