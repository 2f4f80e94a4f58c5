"""Decode-once cache: decoded, resized images kept on disk as fingerprinted shards.

Decoding is the expensive step (a JPEG 2000 radiograph takes ~100 ms, with pydicom holding the
GIL); reading a cached image back takes microseconds. So file rows are decoded once, resized to
the model's size, and stored in shards of ``SHARD_ROWS`` consecutive rows that every later epoch,
run and evaluation reads instead of calling pydicom.

Keys. A shard's key is the sha256 of the preprocessing settings (size, channels, window, frames,
``CACHE_VERSION`` and the versions of every package that can change decoded or resized pixels)
and, for each of its files, the resolved path, size and ``st_mtime_ns``. That identity costs one
``stat`` per file; hashing contents would cost as much I/O as decoding's own read, on every run.
The trade-off: a file rewritten in place with the same size *and* its old mtime restored (``cp -p``
of different content over it, some sync tools) is not noticed, and a moved data folder misses
(its paths changed). Editing, re-exporting or ``touch``-ing a file changes its mtime and re-decodes
exactly that file's shard; changing any setting misses every shard.

Storage. ``<root>/shards/<key>.npy`` holds only pixels (no paths, tags or names: nothing that
identifies a patient leaves the source files) and ``<key>.json`` its row count, dtype and CRC-32.
Both are written atomically and the JSON last, so a shard exists only once complete: an
interrupted build keeps the shards it finished, and a later load builds just the rest. A shard
that fails its checks (missing, truncated, wrong shape, CRC mismatch) is rebuilt, never returned.

Pixels are stored as uint16 (``round(x * 65535)`` of the [0, 1] image): at most 7.7e-6 from the
float32 original, half the bytes of float32 and 30x more precise than float16 (2.4e-4 on the DICOM
corpus). A shard whose values are not in [0, 1] (no decoder here produces that) is stored as
float32 so the cache never changes what a fresh decode gives.

This module imports neither TensorFlow nor Keras at import time: spawned decode workers import it
(through ``medtransfer.data.decode_pool``) and must stay light.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from medtransfer import atomic
from medtransfer.errors import DataError

if TYPE_CHECKING:
    import tensorflow as tf

CACHE_VERSION = 2  # bump when the shard format or the meaning of a key changes (2: NumPy resize)
SHARD_ROWS = 256  # images per shard: 25 MB at 224x224x1, one atomic write each
QUANT_MAX = 65535
QUANT_ERROR = 0.5 / QUANT_MAX + 1e-6  # rounding bound plus float32 slack (clipped 1 + 4e-7)
# Packages whose versions can change decoded or resized pixels (NumPy and SciPy resize).
PIXEL_PACKAGES = (
    "medtransfer",
    "numpy",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pyjpegls",
    "pillow",
    "scipy",
)

Decoder = Callable[[list[str]], np.ndarray]
"""Paths -> float32 [n, H, W, C] at the cache's settings; raises ``UnreadableImages``."""


class UnreadableImages(DataError):
    """Files that could not be decoded, all listed in one message (``errors`` has each line,
    ``paths`` each file, so a caller that may go on without them knows which they are)."""

    def __init__(self, errors: list[str], paths: Sequence[str] = ()) -> None:
        self.errors = errors
        self.paths = list(paths)
        shown = "\n  ".join(errors[:5])
        more = f"\n  ... and {len(errors) - 5} more" if len(errors) > 5 else ""
        super().__init__(f"{len(errors)} image(s) could not be read:\n  {shown}{more}")


def default_cache_dir() -> Path:
    """``$MEDTRANSFER_CACHE``, else ``~/.cache/medtransfer``."""
    configured = os.environ.get("MEDTRANSFER_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "medtransfer"


@dataclass(frozen=True)
class CacheSettings:
    """Everything besides the files themselves that decides the cached pixels."""

    size: tuple[int, int]
    channels: int
    window: str | dict
    frames: str

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (*self.size, self.channels)

    def fingerprint(self) -> str:
        settings = {**asdict(self), "size": [int(n) for n in self.size]}
        versions = {name: _version(name) for name in PIXEL_PACKAGES}
        record = {"cache_version": CACHE_VERSION, "settings": settings, "versions": versions}
        return json.dumps(record, sort_keys=True)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def file_identity(path: str) -> list:
    """Resolved path, size and mtime_ns: a cheap identity (see the module docstring)."""
    resolved = os.path.realpath(path)
    try:
        info = os.stat(resolved)
    except OSError:  # decoding will report it; the key just has to differ from a real file's
        return [resolved, None, None]
    return [resolved, info.st_size, info.st_mtime_ns]


def shard_key(paths: Sequence[str], settings: CacheSettings) -> str:
    digest = hashlib.sha256(settings.fingerprint().encode())
    for path in paths:
        digest.update(json.dumps(file_identity(path)).encode())
    return digest.hexdigest()


def encode_pixels(images: np.ndarray) -> np.ndarray:
    """float32 [0, 1] -> uint16; anything else is kept as float32 rather than altered."""
    finite = np.isfinite(images).all()
    if not finite or images.min(initial=0) < -1e-6 or images.max(initial=0) > 1 + 1e-6:
        return images.astype(np.float32)
    return np.rint(np.clip(images, 0, 1) * QUANT_MAX).astype(np.uint16)


def decode_pixels(stored: np.ndarray) -> np.ndarray:
    if stored.dtype == np.uint16:
        return np.multiply(stored, np.float32(1 / QUANT_MAX), dtype=np.float32)
    return stored.astype(np.float32, copy=False)


class Shard(NamedTuple):
    paths: list[str]
    shape: tuple[int, ...]  # [rows, H, W, C]
    pixels_file: Path
    index_file: Path


class ShardCache:
    """Shards of decoded images under ``root``; ``decode`` is called only for missing shards."""

    def __init__(self, root: str | Path | None = None, shard_rows: int | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.shard_rows = shard_rows or SHARD_ROWS  # read at call time so tests can lower it
        self._writable = True

    def shards(self, paths: Sequence[str], settings: CacheSettings) -> list[Shard]:
        """Consecutive groups of ``shard_rows`` paths, each with its key's file names."""
        found = []
        for start in range(0, len(paths), self.shard_rows):
            group = list(paths[start : start + self.shard_rows])
            stem = self.root / "shards" / shard_key(group, settings)
            shape = (len(group), *settings.image_shape)
            found.append(Shard(group, shape, stem.with_suffix(".npy"), stem.with_suffix(".json")))
        return found

    def load(
        self,
        paths: Sequence[str],
        settings: CacheSettings,
        decode: Decoder,
        *,
        on_decode: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """All images as one float32 [N, H, W, C] array (the in-memory path training uses).

        ``on_decode``, if given, is called once, before the first decode, with the number of
        images about to be decoded (those of shards not built yet; a progress bar's total).
        """
        out = np.empty((len(paths), *settings.image_shape), np.float32)
        start = 0
        for pixels in self._each_shard(self.shards(paths, settings), decode, on_decode):
            out[start : start + len(pixels)] = pixels
            start += len(pixels)
        return out

    def ensure(
        self,
        paths: Sequence[str],
        settings: CacheSettings,
        decode: Decoder,
        *,
        on_decode: Callable[[int], None] | None = None,
    ) -> list[Path]:
        """Build whatever is missing, one shard in memory at a time; return the shard files
        (``on_decode`` as in ``load``)."""
        shards = self.shards(paths, settings)
        for _ in self._each_shard(shards, decode, on_decode):
            pass
        return [shard.pixels_file for shard in shards]

    def dataset(
        self, paths: Sequence[str], settings: CacheSettings, decode: Decoder
    ) -> tf.data.Dataset:
        """Images, in order, streamed from the shard files (for data larger than memory)."""
        return read_shards(self.ensure(paths, settings, decode), settings.image_shape)

    def _each_shard(
        self, shards: list[Shard], decode: Decoder, on_decode: Callable[[int], None] | None = None
    ) -> Iterator[np.ndarray]:
        """Yield each shard's pixels, decoding the missing ones. Unreadable files do not stop
        the build: the other shards are completed and kept, then every bad file is reported."""
        pending = sum(shard.shape[0] for shard in shards if not shard.index_file.is_file())
        if pending and on_decode is not None:  # a damaged shard found later adds to this
            on_decode(pending)
        errors: list[str] = []
        paths: list[str] = []
        for shard in shards:
            pixels = self._read(shard)
            if pixels is None:
                try:
                    pixels = self._build(shard, decode)
                except UnreadableImages as error:
                    errors.extend(error.errors)
                    paths.extend(error.paths)
                    continue
            yield pixels
        if errors:
            raise UnreadableImages(errors, paths)

    def _read(self, shard: Shard) -> np.ndarray | None:
        """A complete, intact shard's pixels, or None (missing or damaged: rebuild it)."""
        try:
            index = json.loads(shard.index_file.read_text())
            stored = np.load(shard.pixels_file, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if (
            index.get("rows") != shard.shape[0]
            or stored.shape != shard.shape
            or stored.dtype.name != index.get("dtype")
            or zlib.crc32(np.ascontiguousarray(stored)) != index.get("crc32")
        ):
            return None
        return decode_pixels(stored)

    def _build(self, shard: Shard, decode: Decoder) -> np.ndarray:
        pixels = decode(shard.paths)
        if pixels.shape != shard.shape:
            raise ValueError(f"decoder returned {pixels.shape}, expected {shard.shape}")
        stored = encode_pixels(pixels)
        if self._writable:
            try:
                with atomic.replace_on_success(shard.pixels_file, "wb") as handle:
                    np.save(handle, stored, allow_pickle=False)
                index = {"rows": len(stored), "dtype": stored.dtype.name}
                index["crc32"] = zlib.crc32(np.ascontiguousarray(stored))
                atomic.write_text(shard.index_file, json.dumps(index))
            except OSError as error:  # a read-only home must not stop training
                self._writable = False
                warnings.warn(
                    f"decode cache {self.root} not writable ({error}); not caching", stacklevel=2
                )
        return decode_pixels(stored)  # what a later read returns, so every run sees the same


def read_shard(path: str | Path) -> np.ndarray:
    """One shard file -> float32 [rows, H, W, C] (no CRC check: ``ShardCache.ensure`` did it)."""
    return decode_pixels(np.load(path, allow_pickle=False))


def read_shards(files: Sequence[str | Path], image_shape: Sequence[int]) -> tf.data.Dataset:
    """A ``tf.data`` pipeline of single images read from shard files, several shards at once.

    ``np.load`` and the uint16 -> float32 conversion release the GIL, so parallel ``map`` calls
    overlap; order is kept (deterministic map), so images line up with their manifest rows.
    """
    import tensorflow as tf

    def read(path: bytes) -> np.ndarray:
        return read_shard(path.decode())

    def read_tensor(path: tf.Tensor) -> tf.Tensor:
        images = tf.numpy_function(read, [path], tf.float32, stateful=False)
        return tf.ensure_shape(images, (None, *image_shape))

    names = tf.data.Dataset.from_tensor_slices([str(f) for f in files])
    return names.map(read_tensor, num_parallel_calls=tf.data.AUTOTUNE).unbatch()
