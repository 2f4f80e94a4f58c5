"""The albumentations adapter on real BreastMNIST images, run through tf.data like the pipeline."""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

A = pytest.importorskip("albumentations")

from medtransfer.data.albumentations_adapter import AlbumentationsAugmenter  # noqa: E402
from medtransfer.errors import SpecError  # noqa: E402

BREASTMNIST = (
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist" / "breastmnist.npz"
)
BATCH = 8


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    """20 real ultrasound images, float32 [20, 28, 28, 1] in [0, 1]."""
    if not BREASTMNIST.is_file():
        pytest.fail(f"shared test data not found at {BREASTMNIST}")
    with np.load(BREASTMNIST) as data:
        images = data["train_images"][:20]
    return (images.astype(np.float32) / 255.0)[..., np.newaxis]


def images_for(gray: np.ndarray, channels: int) -> np.ndarray:
    return np.repeat(gray, channels, axis=-1) if channels == 3 else gray


def typical() -> A.Compose:
    return A.Compose(
        [
            A.Affine(scale=(0.9, 1.1), rotate=(-15, 15), translate_percent=(-0.1, 0.1), p=1.0),
            A.RandomBrightnessContrast(p=1.0),
            A.GaussNoise(std_range=(0.02, 0.05), p=1.0),
        ]
    )


def targets_for(count: int) -> np.ndarray:
    targets = np.zeros((count, 3), np.float32)
    targets[np.arange(count), np.arange(count) % 3] = 1.0
    targets[::4, 2] = np.nan  # unknown labels must come back as they went in
    return targets


def run(augmenter, images: np.ndarray, targets: np.ndarray, run_seed: int = 7):
    """Batches as the training pipeline makes them: last one short, seed per (run, epoch, batch)."""
    dataset = tf.data.Dataset.from_tensor_slices((images, targets)).batch(BATCH).enumerate()

    def augment(index, batch):
        seed = tf.stack([tf.constant(run_seed, tf.int64), index])
        return augmenter(batch[0], batch[1], seed)

    dataset = dataset.map(augment, num_parallel_calls=2, deterministic=True)
    out_images, out_targets = zip(*dataset.as_numpy_iterator(), strict=True)
    return np.concatenate(out_images), np.concatenate(out_targets), dataset.element_spec


@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_range_and_targets_are_kept(gray, channels):
    images = images_for(gray, channels)
    targets = targets_for(len(images))
    out, out_targets, spec = run(AlbumentationsAugmenter(typical()), images, targets)
    assert spec[0].shape.as_list() == [None, 28, 28, channels]
    assert spec[0].dtype == tf.float32
    assert out.shape == images.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.abs(out - images).mean() > 0.01  # it did augment
    np.testing.assert_array_equal(out_targets, targets)  # NaN compares equal here
    if channels == 3:  # the same geometry and brightness on every channel, noise apart
        assert np.abs(out[..., 0] - out[..., 2]).mean() < 0.1


def test_same_seed_same_images_whatever_the_global_random_state(gray):
    targets = targets_for(len(gray))
    random.seed(1)
    np.random.seed(1)
    first, _, _ = run(AlbumentationsAugmenter(typical()), gray, targets)
    random.seed(2)
    np.random.seed(2)
    # A pipeline built with its own Compose seed must not matter either.
    reseeded = typical()
    reseeded.set_random_seed(123)
    second, _, _ = run(AlbumentationsAugmenter(reseeded), gray, targets)
    np.testing.assert_array_equal(first, second)


def test_same_seed_same_images_in_another_process(gray, tmp_path):
    """Another process, another hash seed, no tf.data: only (seed, image) may matter."""
    here, _, _ = run(AlbumentationsAugmenter(typical()), gray, targets_for(len(gray)))
    A.save(typical(), str(tmp_path / "pipeline.json"))
    np.save(tmp_path / "gray.npy", gray)
    script = f"""
import numpy as np
from medtransfer.data.albumentations_adapter import AlbumentationsAugmenter
gray = np.load({str(tmp_path / "gray.npy")!r})
augment = AlbumentationsAugmenter.from_file({str(tmp_path / "pipeline.json")!r})._augment_batch
batches = [gray[start : start + {BATCH}] for start in range(0, len(gray), {BATCH})]
out = [augment(batch, np.array([7, index], np.int64)) for index, batch in enumerate(batches)]
np.save({str(tmp_path / "there.npy")!r}, np.concatenate(out))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=env)
    np.testing.assert_array_equal(here, np.load(tmp_path / "there.npy"))


def test_other_seeds_and_other_batch_positions_differ(gray):
    targets = targets_for(len(gray))
    augmenter = AlbumentationsAugmenter(typical())
    first, _, _ = run(augmenter, gray, targets, run_seed=7)
    other, _, _ = run(augmenter, gray, targets, run_seed=8)
    assert all(not np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    # One image repeated over a batch: every copy must get its own augmentation.
    same = np.repeat(gray[:1], BATCH, axis=0)
    out, _ = augmenter(
        tf.constant(same), tf.constant(targets[:BATCH]), tf.constant([3, 4], tf.int64)
    )
    out = out.numpy()
    assert len({image.tobytes() for image in out}) == BATCH


@pytest.mark.parametrize("channels", [1, 3])
def test_a_known_transform_gives_exactly_its_result(gray, channels):
    images = images_for(gray, channels)
    out, _, _ = run(AlbumentationsAugmenter(A.HorizontalFlip(p=1.0)), images, targets_for(20))
    np.testing.assert_array_equal(out, np.flip(images, axis=2))


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_saved_pipeline_round_trips(gray, tmp_path, suffix):
    path = tmp_path / f"pipeline{suffix}"
    A.save(typical(), str(path), data_format=suffix[1:])
    loaded = AlbumentationsAugmenter.from_file(path)
    targets = targets_for(len(gray))
    expected, _, _ = run(AlbumentationsAugmenter(typical()), gray, targets)
    out, _, _ = run(loaded, gray, targets)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.filterwarnings("ignore:Transform NoSuchTransform:UserWarning")
def test_unloadable_pipeline_files_are_spec_errors(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        AlbumentationsAugmenter.from_file(tmp_path / "missing.json")
    with pytest.raises(SpecError, match=r"\.json, \.yaml or \.yml"):
        AlbumentationsAugmenter.from_file(tmp_path / "pipeline.txt")
    broken = tmp_path / "broken.json"
    broken.write_text('{"transform": {"__class_fullname__": "NoSuchTransform"}}')
    with pytest.raises(SpecError, match=r"broken\.json"):
        AlbumentationsAugmenter.from_file(broken)


def test_a_size_changing_transform_is_named_when_the_pipeline_is_built(gray):
    # Drawn one time in ten and hidden in a OneOf: still caught before the first batch.
    transform = A.Compose([A.OneOf([A.HorizontalFlip(), A.RandomCrop(height=20, width=20)], p=0.1)])
    dataset = tf.data.Dataset.from_tensor_slices((gray, targets_for(20))).batch(BATCH)
    augmenter = AlbumentationsAugmenter(transform)
    # SpecError even through tf.data's AutoGraph, so the CLI reports it as a spec problem.
    with pytest.raises(SpecError, match=r"RandomCrop.*\(28, 28, 1\) to \(20, 20, 1\)"):
        dataset.map(lambda x, y: augmenter(x, y, tf.constant([1, 2], tf.int64)))


def test_a_size_change_at_run_time_is_still_refused(gray):
    augmenter = AlbumentationsAugmenter(A.Resize(height=32, width=32))
    with pytest.raises(ValueError, match=r"\(28, 28, 1\) to \(32, 32, 1\)"):
        augmenter._augment_batch(gray[:2], np.array([1, 2], np.int64))


def test_only_float32_batches_are_accepted(gray):
    augmenter = AlbumentationsAugmenter(A.HorizontalFlip(p=1.0))
    uint8 = tf.constant((gray[:2] * 255).astype(np.uint8))
    with pytest.raises(TypeError, match="float32"):
        augmenter(uint8, tf.zeros([2, 3]), tf.constant([1, 2], tf.int64))


def test_without_the_extra_import_works_and_use_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "albumentations", None)  # makes `import albumentations` fail
    monkeypatch.delitem(sys.modules, "medtransfer.data.albumentations_adapter")
    adapter = importlib.import_module("medtransfer.data.albumentations_adapter")
    with pytest.raises(SpecError, match=r"pip install 'medtransfer\[albumentations\]'"):
        adapter.AlbumentationsAugmenter(object())
    with pytest.raises(SpecError, match=r"pip install 'medtransfer\[albumentations\]'"):
        adapter.AlbumentationsAugmenter.from_file("pipeline.json")
