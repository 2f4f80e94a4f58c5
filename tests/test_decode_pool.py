"""The decode pool: workers decode and resize, so the pixels must be the in-process ones bit
for bit; one pool serves several loads; results stay a bounded window ahead; a dead worker is
one clear error."""

from __future__ import annotations

from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from medtransfer.data import decode_pool, profile
from medtransfer.data.decode_pool import DecodePool, decode_for_model, usable_cores
from medtransfer.data.pipeline import load_images
from medtransfer.data.profile import image_statistics
from medtransfer.errors import DataError
from medtransfer.io import ImageReadError, load_image
from medtransfer.models.inputs import resize_images
from medtransfer.training import run as training_run

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
# Mixed codecs, sizes, colour and multi-frame: what a worker returns must not depend on them.
NAMES = [
    "RG1_J2KI.dcm",  # JPEG 2000, 1955x1841
    "CT1_JLSN.dcm",  # JPEG-LS near-lossless
    "US1_J2KI.dcm",  # colour
    "emri_small_RLE.dcm",  # multi-frame, RLE
    "JPEGBaseline_1s_1f_u_08_08.dcm",
    "gdcm-US-ALOKA-16.dcm",
    "693_UNCI.dcm",
    "MR2_J2KR.dcm",
    "OBXXXX1A_rle.dcm",
]
PATHS = [str(CORPUS / name) for name in NAMES]
SIZE = (48, 40)


@pytest.mark.parametrize("channels", [1, 3])
def test_workers_give_the_in_process_pixels_bit_for_bit(channels: int) -> None:
    rows = pd.DataFrame({"path": PATHS})
    alone = load_images(rows, SIZE, channels, workers=0, use_cache=False, progress=False)
    pooled = load_images(rows, SIZE, channels, workers=2, use_cache=False, progress=False)
    assert pooled.shape == (len(PATHS), *SIZE, channels)
    np.testing.assert_array_equal(pooled, alone)


def test_pixels_are_the_models_resize_of_a_fresh_decode() -> None:
    """What a served model computes from the full image with its in-graph (TensorFlow) resize."""
    with DecodePool(2) as pool:
        decoded = list(pool.decode(PATHS, SIZE, 1, "dicom", "first"))
    for path, pixels in zip(PATHS, decoded, strict=True):
        full = load_image(path).pixels
        plane = full.mean(-1, keepdims=True) if full.ndim == 3 else full[..., None]
        expected = resize_images(plane[None], SIZE).numpy()[0]
        np.testing.assert_allclose(pixels, expected, rtol=0, atol=2e-6)


def test_one_pool_serves_several_loads_and_closes() -> None:
    rows = pd.DataFrame({"path": PATHS})
    with DecodePool(2) as pool:
        load_images(rows, SIZE, 1, workers=pool, use_cache=False, progress=False)
        first = set(pool._executor._processes)
        load_images(rows.iloc[::-1], SIZE, 1, workers=pool, use_cache=False, progress=False)
        assert set(pool._executor._processes) == first and len(first) == 2
    assert pool._executor is None


def test_a_few_files_never_start_the_pool() -> None:
    with DecodePool(2) as pool:
        assert len(list(pool.decode(PATHS[:3], SIZE, 1, "dicom", "first"))) == 3
        assert pool._executor is None


def test_results_are_produced_a_bounded_window_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load of a million files must not queue a million decoded images."""
    submitted: list[str] = []

    class Counting(decode_pool.ProcessPoolExecutor):
        def submit(self, fn, path, *args):
            submitted.append(path)
            return super().submit(fn, path, *args)

    monkeypatch.setattr(decode_pool, "ProcessPoolExecutor", Counting)
    paths = PATHS * 6
    with DecodePool(2) as pool:
        results = pool.decode(paths, SIZE, 1, "dicom", "first")
        next(results)
        assert len(submitted) == 4 * 2
        assert len([*results]) == len(paths) - 1
    assert submitted == paths


def test_unreadable_file_is_its_error_not_the_loads_end(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    outcome = decode_for_model(str(broken), SIZE, 1, "dicom", "first")
    assert isinstance(outcome, ImageReadError)


def test_a_dead_worker_is_one_clear_error() -> None:
    pool = DecodePool(2)
    died: Future = Future()
    died.set_exception(BrokenProcessPool("killed"))
    with pytest.raises(DataError, match=r"decode worker died .*possibly /data/x\.dcm.*inspect"):
        pool._result("/data/x.dcm", died)


def test_default_size_is_the_usable_cores() -> None:
    assert DecodePool().workers == min(usable_cores(), decode_pool.MAX_WORKERS)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        DecodePool(-1)


def test_training_loads_every_split_through_one_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[object] = []

    def record(spec, rows, split, *, workers):
        seen.append(workers)
        return np.zeros((1, 2, 2, 1), np.float32), np.zeros((1, 1), np.float32)

    monkeypatch.setattr(training_run, "load_split", record)
    monkeypatch.setattr(training_run.domain, "check_sites", lambda spec, manifest: None)
    monkeypatch.setattr(training_run.domain, "labelled_rows", lambda spec, m: m)
    monkeypatch.setattr(training_run.domain, "validation_rows", lambda spec, m: m)
    monkeypatch.setattr(
        training_run.domain,
        "load_target_images",
        lambda spec, m, *, workers: seen.append(workers),
    )
    monkeypatch.setattr(training_run, "training_profile", lambda paths, images, seed: {})
    spec = SimpleNamespace(training=SimpleNamespace(seed=0))
    training_run._load_splits(spec, pd.DataFrame({"path": ["a"], "split": ["train"]}), 2)
    assert len(seen) == 3 and all(isinstance(w, DecodePool) for w in seen)
    assert seen[0] is seen[1] is seen[2] and seen[0].workers == 2


def test_image_statistics_of_grey_images_are_those_of_their_plane() -> None:
    """A grey image in three channels is measured on one plane (a third of the work, done for
    every scored file); a colour image, even one differing in one pixel, on all its values."""
    planes = np.random.default_rng(0).random((70, 16, 12, 1), dtype=np.float32)
    images = np.repeat(planes, 3, axis=-1)
    images[5, 3, 4, 1] += 0.5  # image 5 is colour; the 64-image chunk it is in stays exact
    means, stds = image_statistics(images)
    every_value = images.reshape(70, -1).astype(np.float64)
    np.testing.assert_allclose(means, every_value.mean(axis=1), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stds, every_value.std(axis=1), rtol=0, atol=1e-12)
    assert means[5] == every_value[5].mean() and stds[5] == every_value[5].std()
    plane_means, plane_stds = image_statistics(planes)
    assert np.array_equal(means[64:], plane_means[64:])
    assert np.array_equal(stds[64:], plane_stds[64:])
    assert profile._one_channel_if_grey(images[64:]).shape == (6, 16, 12, 1)
    assert profile._one_channel_if_grey(images[:64]).shape == (64, 16, 12, 3)
