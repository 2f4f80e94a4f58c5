"""Augmentation: every option on real images, presets, exact soft labels, seeded determinism."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow as tf

from medtransfer.data.augment import GraphAugmenter, batch_seed, make_augmenter
from medtransfer.data.augment_layers import Flip, RandomGamma, RandomRot90
from medtransfer.data.augment_presets import OPTIONS, PRESETS, Setting
from medtransfer.data.augment_random import StatelessDraws
from medtransfer.data.augment_settings import resolve_settings
from medtransfer.data.pipeline import make_training_dataset
from medtransfer.errors import SpecError
from medtransfer.spec import spec_from_dict
from tests.conftest import REPO, SHARED_DATA

MEDMNIST = SHARED_DATA / "medmnist"


def _npz_images(name: str, count: int) -> np.ndarray:
    with np.load(MEDMNIST / f"{name}.npz") as archive:
        raw = archive["train_images"][:count]
    images = raw.astype(np.float32) / 255.0
    return images[..., None] if images.ndim == 3 else images


@pytest.fixture(scope="module")
def grey() -> np.ndarray:
    return _npz_images("breastmnist", 16)  # ultrasound, 28x28x1


@pytest.fixture(scope="module")
def colour() -> np.ndarray:
    return _npz_images("retinamnist", 16)  # fundus photographs, 28x28x3


def _seed(epoch: int = 0, batch: int = 0, run_seed: int = 0) -> tf.Tensor:
    return batch_seed(run_seed, tf.constant(epoch), tf.constant(batch))


def _augment(settings, images, targets, seed=None):
    out, labels = GraphAugmenter(settings)(
        tf.constant(images), tf.constant(targets), _seed() if seed is None else seed
    )
    return out.numpy(), labels.numpy()


def _spec(tmp_path, **sections):
    raw = {
        "name": "aug",
        "task": "binary",
        "classes": ["normal", "pneumonia"],
        "data": {"format": "npz", "path": str(MEDMNIST / "pneumoniamnist.npz")},
        "image": {"size": [32, 32], "channels": 1},
        "model": {"weights": "none"},
    }
    raw.update(sections)
    return spec_from_dict(raw, base_dir=tmp_path)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_option_keeps_shape_dtype_range_and_labels(name, grey, colour):
    for images in (grey, colour):
        if OPTIONS[name].rgb_only and images.shape[-1] == 1:
            continue
        targets = np.eye(2, dtype=np.float32)[np.arange(len(images)) % 2]
        out, labels = _augment({name: Setting(1.0, OPTIONS[name].magnitude)}, images, targets)
        assert out.shape == images.shape and out.dtype == np.float32
        assert out.min() >= 0.0 and out.max() <= 1.0
        assert np.abs(out - images).max() > 1e-3, f"{name} left the images unchanged"
        if name in ("mixup", "cutmix"):
            np.testing.assert_allclose(labels.sum(axis=1), 1.0, atol=1e-6)
        else:
            np.testing.assert_array_equal(labels, targets)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_images_not_chosen_are_left_exactly_as_they_were(name, grey):
    """Probability ~0: no image is chosen (some Keras layers fail on an empty batch, and a
    grey image sent through an RGB policy must come back bit-identical)."""
    images = np.repeat(grey, 3, axis=-1) if OPTIONS[name].rgb_only else grey
    targets = np.eye(2, dtype=np.float32)[np.arange(len(images)) % 2]
    out, labels = _augment({name: Setting(1e-9, OPTIONS[name].magnitude)}, images, targets)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(labels, targets)


def test_same_seed_same_batches_and_epochs_differ(grey):
    targets = np.zeros((len(grey), 1), np.float32)
    # the xray preset plus erasing and MixUp; the costly policies and elastic are covered by
    # the other-process test below
    settings = {**PRESETS["xray"], "erasing": Setting(0.5, 0.2), "mixup": Setting(0.5, 0.2)}
    augment = GraphAugmenter(settings, seed=3)

    def batches(seed):
        ds = make_training_dataset(
            grey, targets, batch_size=8, seed=seed, epochs=range(2), augment=augment
        )
        return [x.numpy() for x, _ in ds]

    first, again, other = batches(0), batches(0), batches(1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    # the same images in epochs 0 and 1 (batch 0) get different augmentations
    x = tf.constant(grey)
    epoch0, _ = augment(x, tf.constant(targets), _seed(epoch=0))
    epoch1, _ = augment(x, tf.constant(targets), _seed(epoch=1))
    assert np.abs(epoch0.numpy() - epoch1.numpy()).mean() > 1e-3


_OTHER_PROCESS = """
import hashlib, numpy as np, tensorflow as tf
from medtransfer.data.augment import GraphAugmenter, batch_seed
from medtransfer.data.augment_presets import OPTIONS, Setting
x = np.load({path!r})["train_images"][:8].astype("float32")[..., None] / 255
settings = {{n: Setting(0.7, OPTIONS[n].magnitude) for n in ("elastic", "randaugment", "augmix",
    "gamma", "noise", "erasing", "mixup")}}
out, _ = GraphAugmenter(settings, seed=5)(tf.constant(x), tf.zeros([8, 1]),
    batch_seed(5, tf.constant(2), tf.constant(1)))
print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
"""


def test_another_process_draws_the_same_augmentations():
    """Stateless draws: nothing depends on what this process did before (AugMix's Python-level
    choice of operations included)."""
    script = _OTHER_PROCESS.format(path=str(MEDMNIST / "breastmnist.npz"))
    there = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True
    ).stdout.strip()
    tf.random.uniform([3])  # disturb this process's global random state first
    import hashlib

    x = _npz_images("breastmnist", 8)
    names = ("elastic", "randaugment", "augmix", "gamma", "noise", "erasing", "mixup")
    settings = {n: Setting(0.7, OPTIONS[n].magnitude) for n in names}
    out, _ = GraphAugmenter(settings, seed=5)(tf.constant(x), tf.zeros([8, 1]), _seed(2, 1, 5))
    here = hashlib.sha256(out.numpy().tobytes()).hexdigest()
    assert there == here


def _constant_batch(values: np.ndarray, size: int = 24, channels: int = 1) -> np.ndarray:
    return np.broadcast_to(values[:, None, None, None], (len(values), size, size, channels)).copy()


@pytest.mark.parametrize("name", ["mixup", "cutmix"])
def test_soft_labels_are_exactly_the_pixel_shares(name):
    """Image i is a constant v_i and its label is v_i itself, so after mixing, each image's mean
    is exactly the share-weighted label it must carry (and a multiclass label's rows likewise)."""
    values = np.linspace(0.05, 0.95, 32).astype(np.float32)
    images = _constant_batch(values)
    binary = values[:, None]
    multiclass = np.stack([values, 1 - values, np.zeros_like(values)], axis=1)
    for targets in (binary, multiclass):
        out, labels = _augment({name: Setting(1.0, OPTIONS[name].magnitude)}, images, targets)
        means = out.mean(axis=(1, 2, 3))
        np.testing.assert_allclose(labels[:, 0], means, atol=2e-6)
        if targets.shape[1] == 3:
            np.testing.assert_allclose(labels[:, 1], 1 - means, atol=2e-6)
            np.testing.assert_array_equal(labels[:, 2], 0.0)
        mixed = np.abs(means - values) > 1e-4
        assert mixed.sum() >= 16, "most images should have been mixed with another"


@pytest.mark.parametrize(("name", "magnitude"), [("mixup", 1000.0), ("cutmix", 1.0)])
def test_mixing_with_an_unknown_label_is_unknown_and_unmixed_images_keep_theirs(name, magnitude):
    """Every fourth image's second label is unknown (NaN). MixUp's alpha is large so a mixed
    image's mean moves visibly (weights near 0.5); CutMix moves it by every pasted pixel."""
    values = np.linspace(0.05, 0.95, 32).astype(np.float32)
    images = _constant_batch(values)
    second = np.where(np.arange(32) % 4 == 0, np.nan, 1.0)
    targets = np.stack([values, second], axis=1).astype(np.float32)
    out, labels = _augment({name: Setting(0.5, magnitude)}, images, targets)
    means = out.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(labels[:, 0], means, atol=2e-6)
    unmixed = np.abs(means - values) < 1e-6  # not chosen (or mixed with itself)
    assert 4 <= unmixed.sum() <= 28
    np.testing.assert_array_equal(labels[unmixed], targets[unmixed])  # NaN == NaN here
    known = ~np.isnan(labels[:, 1])
    np.testing.assert_allclose(labels[known, 1], 1.0, atol=1e-6)  # 1 mixed with 1 is 1
    assert np.isnan(labels[np.isnan(second), 1]).all()  # own unknown stays unknown
    took_partners_unknown = np.isnan(labels[:, 1]) & ~np.isnan(second)
    assert took_partners_unknown.any() and not (took_partners_unknown & unmixed).any()


def test_probability_is_the_share_of_images_changed(grey):
    images = np.repeat(grey, 25, axis=0)  # 400 images
    targets = np.zeros((len(images), 1), np.float32)
    out, _ = _augment({"gamma": Setting(0.3, 0.5)}, images, targets)
    changed = np.abs(out - images).max(axis=(1, 2, 3)) > 1e-6
    assert abs(changed.mean() - 0.3) < 0.08


def test_small_layers_do_exactly_what_they_say(grey):
    x = tf.constant(grey)
    flipped = Flip("horizontal").transform_images(x, None).numpy()
    np.testing.assert_array_equal(flipped, grey[:, :, ::-1])
    np.testing.assert_array_equal(Flip("vertical").transform_images(x, None), grey[:, ::-1])
    rot = RandomRot90()
    turned = rot.transform_images(x, rot.get_random_transformation(x, seed=StatelessDraws(_seed())))
    for image, out in zip(grey, turned.numpy(), strict=True):
        assert any(np.array_equal(out, np.rot90(image, k)) for k in (1, 2, 3))
    gamma = RandomGamma(0.5)
    t = gamma.get_random_transformation(x, seed=StatelessDraws(_seed()))
    ends = gamma.transform_images(tf.constant([[[[0.0]], [[1.0]]]]), {"gamma": t["gamma"][:1]})
    np.testing.assert_array_equal(ends.numpy().ravel(), [0.0, 1.0])
    g = float(t["gamma"].numpy().ravel()[0])
    np.testing.assert_allclose(gamma.transform_images(x, t).numpy()[0], grey[0] ** g, rtol=1e-5)
    assert np.exp(-0.5) <= t["gamma"].numpy().min() < t["gamma"].numpy().max() <= np.exp(0.5)


def test_xray_preset_never_flips():
    assert not [name for name in PRESETS["xray"] if OPTIONS[name].flips]
    # left half bright: after any xray augmentation the bright side is still the left one
    image = np.full((28, 28, 1), 0.2, np.float32)
    image[:, :14] = 0.8
    images = np.repeat(image[None], 64, axis=0)
    augment = GraphAugmenter(PRESETS["xray"], seed=0)
    for epoch in range(5):
        out, _ = augment(tf.constant(images), tf.zeros([64, 1]), _seed(epoch))
        left = out.numpy()[:, 4:24, 4:12].mean(axis=(1, 2, 3))
        right = out.numpy()[:, 4:24, 16:24].mean(axis=(1, 2, 3))
        assert (left > right + 0.2).all()


def test_spec_chooses_preset_by_modality_and_overrides_options(tmp_path):
    assert resolve_settings(_spec(tmp_path, modality="xray")) == PRESETS["xray"]
    assert resolve_settings(_spec(tmp_path)) == PRESETS["light"]  # modality other
    assert resolve_settings(_spec(tmp_path, augmentation={"preset": "none"})) == {}
    spec = _spec(
        tmp_path,
        modality="xray",
        augmentation={
            "options": {
                "rotation": {"magnitude": 3},  # keeps the preset's probability
                "noise": {"probability": 0},  # removed
                "mixup": {"probability": 0.25},  # added with its default magnitude
            }
        },
    )
    settings = resolve_settings(spec)
    assert settings["rotation"] == Setting(PRESETS["xray"]["rotation"].probability, 3.0)
    assert "noise" not in settings
    assert settings["mixup"] == Setting(0.25, OPTIONS["mixup"].magnitude)
    assert list(settings) == [n for n in OPTIONS if n in settings]  # application order
    assert make_augmenter(_spec(tmp_path, augmentation={"preset": "none"})) is None


def test_flips_on_radiographs_warn_and_impossible_options_are_refused(tmp_path):
    flips = {"options": {"flip_horizontal": {"probability": 0.5}}}
    with pytest.warns(UserWarning, match="laterality"):
        make_augmenter(_spec(tmp_path, modality="xray", augmentation=flips))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        colour = {"size": [32, 32], "channels": 3}
        make_augmenter(_spec(tmp_path, modality="dermoscopy", image=colour, augmentation=flips))
    with pytest.raises(SpecError, match=re.escape("'hue' needs image.channels: 3")):
        make_augmenter(_spec(tmp_path, augmentation={"options": {"hue": {"probability": 1}}}))
    with pytest.raises(SpecError, match=re.escape("unknown options ['rotate']")):
        _spec(tmp_path, augmentation={"options": {"rotate": {"probability": 1}}})
    with pytest.raises(SpecError, match=re.escape("augmentation.options.zoom.probability")):
        _spec(tmp_path, augmentation={"options": {"zoom": {"probability": 1.5}}})
    with pytest.raises(SpecError, match=re.escape("augmentation.albumentations")):
        _spec(tmp_path, augmentation={"albumentations": "missing.yaml"})


def test_spec_runs_a_saved_albumentations_pipeline_after_the_graph_options(tmp_path, grey):
    import albumentations

    albumentations.save(
        albumentations.Compose([albumentations.HorizontalFlip(p=1.0)]), str(tmp_path / "p.json")
    )
    targets = tf.zeros([len(grey), 1])
    alone = make_augmenter(
        _spec(tmp_path, augmentation={"preset": "none", "albumentations": "p.json"})
    )
    out, _ = alone(tf.constant(grey), targets, _seed())
    np.testing.assert_array_equal(out.numpy(), grey[:, :, ::-1])
    chained = make_augmenter(_spec(tmp_path, augmentation={"albumentations": "p.json"}))
    first, _ = chained(tf.constant(grey), targets, _seed())
    again, _ = chained(tf.constant(grey), targets, _seed())
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    graph_only, _ = GraphAugmenter(PRESETS["light"])(tf.constant(grey), targets, _seed())
    assert not np.array_equal(first.numpy(), graph_only.numpy()[:, :, ::-1])  # seeds differ
    assert np.abs(first.numpy() - grey[:, :, ::-1]).mean() > 1e-3  # graph options ran too


def test_preview_takes_classes_in_turn_and_writes_mixed_labels_as_shares():
    from medtransfer.data.preview import _label_text, pick_examples

    targets = np.eye(2, dtype=np.float32)[[1, 1, 1, 1, 0, 1, 0]]
    np.testing.assert_array_equal(pick_examples(targets, 4), [4, 0, 6, 1])
    assert len(pick_examples(targets, 50)) == 7
    classes = ["benign", "malignant"]
    assert _label_text(np.array([0.0, 1.0]), classes) == "malignant"
    assert _label_text(np.array([0.25, 0.75]), classes) == "benign 0.25, malignant 0.75"
    assert _label_text(np.array([np.nan, 1.0]), classes) == "malignant"


def _centroids(images: np.ndarray) -> np.ndarray:
    """(y, x) intensity centroid of each [H, W, 1] image."""
    grid_y, grid_x = np.mgrid[: images.shape[1], : images.shape[2]]
    weights = images[..., 0]
    total = weights.sum(axis=(1, 2))
    return np.stack(
        [(weights * grid_y).sum((1, 2)) / total, (weights * grid_x).sum((1, 2)) / total], 1
    )


def test_geometry_is_one_affine_resampling_with_the_promised_ranges():
    """A bright dot off the centre of a 29x29 image: rotation keeps its distance from the centre
    and turns it by at most the magnitude, both ways; zoom scales that distance by at most
    1 +- magnitude; translation moves it by at most the magnitude times the size."""
    image = np.zeros((29, 29, 1), np.float32)
    image[6:9, 20:23] = 1.0  # centroid (7, 21); the centre is (14, 14)
    images = np.repeat(image[None], 64, axis=0)
    centre, dot = np.array([14.0, 14.0]), np.array([7.0, 21.0])
    radius, angle = np.linalg.norm(dot - centre), np.arctan2(*(dot - centre))

    def moved(name, magnitude):
        out, _ = _augment({name: Setting(1.0, magnitude)}, images, np.zeros((64, 1), np.float32))
        return _centroids(out) - centre

    offsets = moved("rotation", 20.0)
    np.testing.assert_allclose(np.linalg.norm(offsets, axis=1), radius, atol=0.3)
    turned = np.degrees(np.arctan2(offsets[:, 0], offsets[:, 1]) - angle)
    assert np.abs(turned).max() <= 20.5 and turned.min() < -5 and turned.max() > 5
    ratio = np.linalg.norm(moved("zoom", 0.2), axis=1) / radius
    assert 1 / 1.2 - 0.03 <= ratio.min() < 0.97 and 1.03 < ratio.max() <= 1 / 0.8 + 0.03
    shift = moved("translation", 0.1) - (dot - centre)
    assert np.abs(shift).max() <= 0.1 * 29 + 0.3 and np.abs(shift).max() > 1.0


def test_medtransfer_layers_round_trip_through_their_config(grey):
    from medtransfer.data.augment_layers import RandomAffine, RandomGaussianNoise

    layers = [
        RandomGamma(0.3, seed=1),
        RandomGaussianNoise(0.02, seed=2),
        RandomRot90(seed=3),
        Flip("vertical"),
        RandomAffine(rotation=(0.5, 5.0), translation=(0.2, 0.1), seed=4),
    ]
    x = tf.constant(grey)
    for layer in layers:
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
        draws = [StatelessDraws(_seed()) for _ in range(2)]
        outs = [
            lay.transform_images(x, lay.get_random_transformation(x, seed=d))
            for lay, d in zip((layer, clone), draws, strict=True)
        ]
        np.testing.assert_array_equal(outs[0].numpy(), outs[1].numpy())
