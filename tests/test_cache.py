"""Decode-once cache: reuse across runs, invalidation, resumable builds, damaged shards, tf.data.

Real DICOM files from ../shared/data/dicom/corpus are copied into tmp_path (so mtimes can be
touched), plus small generated PNGs. Shards are lowered to 4 rows so a dozen files make several.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtransfer.data import cache, decode_pool, pipeline
from medtransfer.data.cache import QUANT_ERROR, CacheSettings, ShardCache
from medtransfer.data.decode_pool import DecodePool
from medtransfer.data.pipeline import load_images
from medtransfer.errors import DataError
from medtransfer.io import load_image
from medtransfer.models.inputs import resize_images, to_model_input

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
# Small, quick files that between them cover RLE, JPEG 2000, JPEG-LS, big endian, MONOCHROME1.
DICOM_FILES = [
    "emri_small.dcm",
    "emri_small_RLE.dcm",
    "emri_small_big_endian.dcm",
    "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm",
    "MR2_J2KR.dcm",
    "RG2_JPLL.dcm",
    "CT1_JLSN.dcm",
]
ROWS = 4
SIZE = (32, 32)
REAL_DECODE_FILES = pipeline._decode_files


@pytest.fixture(autouse=True)
def small_shards(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cache, "SHARD_ROWS", ROWS)


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    """12 files = 3 shards: 8 real DICOM files, then 4 PNGs (grey, RGB, 16-bit, odd size)."""
    folder = tmp_path / "images"
    folder.mkdir()
    paths = [str(shutil.copy2(CORPUS / name, folder / name)) for name in DICOM_FILES]
    rng = np.random.default_rng(0)
    pngs = {
        "grey.png": rng.integers(0, 256, (40, 40), dtype=np.uint8),
        "rgb.png": rng.integers(0, 256, (30, 50, 3), dtype=np.uint8),
        "deep.png": rng.integers(0, 65536, (36, 36), dtype=np.uint16),
        "odd.png": rng.integers(0, 256, (17, 61), dtype=np.uint8),
    }
    for name, pixels in pngs.items():
        Image.fromarray(pixels).save(folder / name)
        paths.append(str(folder / name))
    return paths


class Interrupted(Exception):
    pass


class CountingDecoder:
    """Wraps ``pipeline._decode_files`` to record which files were decoded, in which call."""

    def __init__(self, fail_after_calls: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_after_calls = fail_after_calls

    def __call__(self, paths, settings, pool):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise Interrupted  # the build is stopped mid-way (Ctrl-C, a killed job)
        self.calls.append(list(paths))
        return REAL_DECODE_FILES(paths, settings, pool)

    @property
    def decoded(self) -> list[str]:
        return [path for call in self.calls for path in call]


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CountingDecoder:
    counting = CountingDecoder()
    monkeypatch.setattr(pipeline, "_decode_files", counting)
    return counting


def load(paths: list[str], root: Path, **settings) -> np.ndarray:
    options = {"window": "dicom", "frames": "first", **settings}
    size = options.pop("size", SIZE)
    frame = pd.DataFrame({"path": paths})
    return load_images(frame, size, 1, workers=0, cache_dir=root, **options)


def shard_files(root: Path) -> set[Path]:
    return set((root / "shards").glob("*.npy"))


def test_second_load_never_decodes(
    images: list[str], tmp_path: Path, counter: CountingDecoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = load(images, tmp_path / "cache")
    assert sorted(counter.decoded) == sorted(images) and len(counter.calls) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr("medtransfer.io.dicom.pydicom.dcmread", no_decoding)
    monkeypatch.setattr(decode_pool, "load_image", no_decoding)
    second = load(images, tmp_path / "cache")
    assert len(counter.calls) == 3
    np.testing.assert_array_equal(second, first)


@pytest.mark.parametrize("channels", [1, 3])
def test_cached_pixels_equal_a_fresh_decode(
    images: list[str], tmp_path: Path, channels: int
) -> None:
    reference = to_model_input([load_image(p).pixels for p in images], SIZE, channels)
    frame = pd.DataFrame({"path": images})
    for _ in range(2):  # building, then reading back
        cached = load_images(frame, SIZE, channels, workers=0, cache_dir=tmp_path)
        assert cached.dtype == np.float32 and cached.shape == reference.shape
        assert np.abs(cached - reference).max() <= QUANT_ERROR
    assert np.abs(reference - reference.astype(np.float16)).max() > 1e-4  # why not float16
    uncached = load_images(frame, SIZE, channels, workers=0, use_cache=False)
    np.testing.assert_array_equal(uncached, reference)
    # and what a served model computes from the full image with its in-graph resize
    in_graph = np.stack([_in_graph(load_image(p).pixels, channels) for p in images])
    assert np.abs(cached - in_graph).max() <= 1e-5


def _in_graph(pixels: np.ndarray, channels: int) -> np.ndarray:
    plane = pixels[..., None] if pixels.ndim == 2 else pixels
    if plane.shape[-1] != channels:
        plane = plane.mean(-1, keepdims=True) if channels == 1 else np.repeat(plane, 3, -1)
    return resize_images(plane[None], SIZE).numpy()[0]


def test_touched_file_redecodes_only_its_shard(
    images: list[str], tmp_path: Path, counter: CountingDecoder
) -> None:
    first = load(images, tmp_path / "cache")
    before = shard_files(tmp_path / "cache")
    stat = os.stat(images[5])
    os.utime(images[5], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    again = load(images, tmp_path / "cache")
    assert counter.calls[3:] == [images[4:8]]
    assert len(shard_files(tmp_path / "cache") - before) == 1
    np.testing.assert_array_equal(again, first)


def test_rewritten_file_redecodes_only_its_shard(
    images: list[str], tmp_path: Path, counter: CountingDecoder
) -> None:
    load(images, tmp_path / "cache")
    grey = images[8]
    Image.fromarray(np.full((40, 40), 200, np.uint8)).save(grey)  # rewritten: new mtime
    again = load(images, tmp_path / "cache")
    assert counter.calls[3:] == [images[8:12]]
    assert np.allclose(again[8], 200 / 255, atol=QUANT_ERROR)


@pytest.mark.parametrize(
    "change", [{"size": (24, 24)}, {"window": "minmax"}, {"window": {"center": 40, "width": 400}}]
)
def test_changed_setting_misses_and_old_settings_still_hit(
    images: list[str], tmp_path: Path, counter: CountingDecoder, change: dict
) -> None:
    load(images, tmp_path / "cache")
    load(images, tmp_path / "cache", **change)
    assert len(counter.calls) == 6
    load(images, tmp_path / "cache")
    load(images, tmp_path / "cache", **change)
    assert len(counter.calls) == 6


def test_interrupted_build_keeps_completed_shards(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    interrupted = CountingDecoder(fail_after_calls=2)
    monkeypatch.setattr(pipeline, "_decode_files", interrupted)
    with pytest.raises(Interrupted):
        load(images, tmp_path / "cache")
    assert len(shard_files(tmp_path / "cache")) == 2
    leftovers = [p for p in (tmp_path / "cache" / "shards").iterdir() if p.suffix == ".tmp"]
    assert not leftovers

    rerun = CountingDecoder()
    monkeypatch.setattr(pipeline, "_decode_files", rerun)
    resumed = load(images, tmp_path / "cache")
    assert rerun.calls == [images[8:12]]
    fresh = load(images, tmp_path / "fresh")
    np.testing.assert_array_equal(resumed, fresh)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _flip_a_pixel(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-7] ^= 0xFF
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"not a shard")


def _drop_index(path: Path) -> None:
    path.with_suffix(".json").unlink()


@pytest.mark.parametrize("damage", [_truncate, _flip_a_pixel, _garbage, _drop_index])
def test_damaged_shard_is_rebuilt_never_returned(
    images: list[str], tmp_path: Path, counter: CountingDecoder, damage
) -> None:
    root = tmp_path / "cache"
    first = load(images, root)
    settings = CacheSettings(SIZE, 1, "dicom", "first")
    middle = ShardCache(root).shards(images, settings)[1]
    damage(middle.pixels_file)
    again = load(images, root)
    assert counter.calls[3:] == [images[4:8]]
    np.testing.assert_array_equal(again, first)


def test_tf_data_reader_yields_the_array_path_images(images: list[str], tmp_path: Path) -> None:
    settings = CacheSettings(SIZE, 1, "dicom", "first")
    array = load(images, tmp_path)
    with pipeline._ShardDecoder(settings, DecodePool(0)) as decode:
        dataset = ShardCache(tmp_path).dataset(images, settings, decode)
    streamed = np.stack([image.numpy() for image in dataset])
    np.testing.assert_array_equal(streamed, array)
    assert dataset.element_spec.shape == (*SIZE, 1)


def test_unreadable_files_are_listed_and_good_shards_kept(
    images: list[str], tmp_path: Path, counter: CountingDecoder
) -> None:
    broken = Path(images[0]).with_name("broken.dcm")
    broken.write_bytes(b"DICM" * 10)
    paths = [*images, str(broken)]
    with pytest.raises(DataError, match=r"1 image\(s\) could not be read:\n  .*broken\.dcm"):
        load(paths, tmp_path / "cache")
    assert len(shard_files(tmp_path / "cache")) == 3
    with pytest.raises(DataError, match=r"broken\.dcm"):
        load(paths, tmp_path / "cache")
    assert counter.calls[4:] == [[str(broken)]]


def test_shards_hold_pixels_only(images: list[str], tmp_path: Path) -> None:
    load(images, tmp_path / "cache")
    names = [Path(p).stem.encode() for p in images[:8]] + [str(tmp_path).encode()]
    for file in (tmp_path / "cache" / "shards").iterdir():
        content = file.read_bytes()
        assert not any(name in content for name in names), file


def test_mixed_npz_and_file_rows_keep_their_order(images: list[str], tmp_path: Path) -> None:
    archive = tmp_path / "tiny.npz"
    npz_images = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.savez(archive, test_images=npz_images)
    paths = [f"{archive}#test/0", images[0], f"{archive}#test/1", images[9]]
    mixed = load(paths, tmp_path / "cache")
    alone = load([images[0], images[9]], tmp_path / "cache")
    np.testing.assert_array_equal(mixed[[1, 3]], alone)
    expected = to_model_input(list(npz_images / np.float32(255)), SIZE, 1)
    np.testing.assert_allclose(mixed[[0, 2]], expected, atol=1e-6)


def test_default_root_and_use_cache_false(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDTRANSFER_CACHE", str(tmp_path / "env"))
    assert ShardCache().root == tmp_path / "env"
    frame = pd.DataFrame({"path": images[:4]})
    load_images(frame, SIZE, 1, workers=0, use_cache=False)
    assert not (tmp_path / "env").exists()
    load_images(frame, SIZE, 1, workers=0)
    assert len(shard_files(tmp_path / "env")) == 1


def test_unwritable_cache_warns_and_still_loads(images: list[str], tmp_path: Path) -> None:
    blocked = tmp_path / "file-not-dir"
    blocked.write_text("")
    with pytest.warns(UserWarning, match="not writable"):
        loaded = load(images, blocked / "cache")
    np.testing.assert_array_equal(loaded, load(images, tmp_path / "ok"))


def test_out_of_range_pixels_are_stored_exactly() -> None:
    odd = np.array([[-0.5, 0.25], [1.5, np.nan]], np.float32)
    assert cache.encode_pixels(odd).dtype == np.float32
    np.testing.assert_array_equal(cache.decode_pixels(cache.encode_pixels(odd)), odd)


def test_decode_workers_do_not_import_tensorflow() -> None:
    code = "import sys, medtransfer.data.decode_pool; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_process_pool_build_then_cached_read(
    images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cache, "SHARD_ROWS", 8)  # the pool starts for 8 files or more
    frame = pd.DataFrame({"path": images})
    pooled = load_images(frame, SIZE, 1, workers=2, cache_dir=tmp_path / "cache")
    alone = load(images, tmp_path / "alone")
    np.testing.assert_array_equal(pooled, alone)
