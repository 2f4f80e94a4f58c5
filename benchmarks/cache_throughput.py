"""Decode-once cache: decoding (cold cache) vs reading cached shards, in the same run.

The manifest is the 39 real DICOM files of ../shared/data/dicom/corpus (JPEG 2000 radiographs up
to 2500x2048, JPEG-LS, RLE, ...) listed ``--repeat`` times. ``load_images`` first builds the cache
(spawn decode pool, ``--workers`` processes; what a run's first epoch pays), then the same rows
are read back ``--reads`` times through the array path (what later runs and evaluations do) and
through the ``tf.data`` shard reader (for data larger than memory); the median read is reported.
Prints images/s for each and the ratio to decoding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"


def _median_seconds(action: Callable[[], object], times: int) -> float:
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        action()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=8, help="copies of the corpus in the rows")
    parser.add_argument("--workers", type=int, default=2, help="decode processes")
    parser.add_argument("--size", type=int, default=224, help="model input size (square)")
    parser.add_argument("--reads", type=int, default=5, help="cached reads to take the median of")
    args = parser.parse_args()

    import numpy as np
    import pandas as pd

    from medtransfer.data.cache import CacheSettings, ShardCache
    from medtransfer.data.decode_pool import DecodePool
    from medtransfer.data.pipeline import _ShardDecoder, load_images

    paths = [str(p) for p in sorted(CORPUS.glob("*.dcm"))] * args.repeat
    rows = pd.DataFrame({"path": paths})
    size = (args.size, args.size)
    with tempfile.TemporaryDirectory() as root:

        def load() -> np.ndarray:
            return load_images(rows, size, 1, workers=args.workers, cache_dir=root)

        started = time.perf_counter()
        built = load()
        decode_s = time.perf_counter() - started
        array_s = _median_seconds(load, args.reads)

        settings = CacheSettings(size, 1, "dicom", "first")
        with _ShardDecoder(settings, DecodePool(0)) as no_decoding:
            dataset = ShardCache(root).dataset(paths, settings, no_decoding).batch(32)
        streamed = np.concatenate([batch.numpy() for batch in dataset])
        assert np.array_equal(streamed, built), "tf.data reader disagrees with the array path"
        tfdata_s = _median_seconds(lambda: [batch for batch in dataset], args.reads)
        n_shards = len(list((Path(root) / "shards").glob("*.npy")))

    n = len(paths)
    print(f"{n} images ({len(paths) // args.repeat} files x {args.repeat}), {n_shards} shards")
    build = f"decode + build cache (workers={args.workers})"
    print(f"{build:<36}{decode_s:7.2f} s {n / decode_s:10.1f}/s")
    for name, seconds in (("cached, array path", array_s), ("cached, tf.data path", tfdata_s)):
        ratio = decode_s / seconds
        print(f"{name:<36}{seconds:7.3f} s {n / seconds:10.1f}/s  ratio {ratio:.0f}x")
    print(f"(cores: {os.cpu_count()}, {args.size} px, median of {args.reads} reads)")


if __name__ == "__main__":
    main()
