"""Scoring memory: peak RSS when scoring 1,000 vs 10,000 small files (target: within 10%).

``score_folder`` streams: files are crawled lazily, a bounded window is decoded ahead and rows go
to disk batch by batch, so its memory must not grow with the size of the folder. This writes
``--small`` and ``--large`` 64x64 DICOM files (one folder each) and scores each folder with
``workers=2``, batch 16 (the CLI's defaults) and a light predictor: ``--predictor keras``
(default) is a one-convolution Keras model at 64 px through ``KerasPredictor``, the real
prediction path; ``--predictor stand-in`` has no network and no TensorFlow, so growth in scoring
itself is a larger share of the total.

Each folder is scored in a fresh Python process, so neither run inherits the other's heap. In it
a background thread samples, every 10 ms, the RSS of the scoring process and of its child
processes (the decode workers and multiprocessing's resource tracker, each once it has exec'd)
with psutil and keeps the peak of their sum. The baseline is that sum just before
``score_folder`` (model built and warmed up), so peak - baseline is what scoring added, workers
included. Summed RSS counts pages shared between processes (libraries) once per process: an
upper bound of the memory used, the same in both runs. Also printed: the scoring process's own
``getrusage`` ru_maxrss, a cross-check of the sampling. (``RUSAGE_CHILDREN`` cannot check the
workers: a spawned worker is forked before it execs, so its ru_maxrss is the parent's size at
that moment.)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _common import CLASSES, StandInPredictor, write_dicoms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MB = 2**20


class PeakRss:
    """Samples the RSS of this process and of its children in a thread; keeps the peak sum."""

    def __init__(self, interval: float = 0.01) -> None:
        self._process = psutil.Process()
        self._cmdline = self._process.cmdline()
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = self.peak_main = self.peak_children = 0

    def current(self) -> int:
        main, children = self._sample()
        return main + children

    def _sample(self) -> tuple[int, int]:
        main = self._process.memory_info().rss
        children = 0
        for child in self._process.children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):  # exited since the listing
                # A worker is forked before it execs a fresh interpreter; until then it still has
                # this process's command line and reports this process's pages as its own.
                if child.cmdline() != self._cmdline:
                    children += child.memory_info().rss
        self.peak = max(self.peak, main + children)
        self.peak_main = max(self.peak_main, main)
        self.peak_children = max(self.peak_children, children)
        return main, children

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(folder: Path, out: Path, predictor_kind: str, workers: int, batch: int) -> dict:
    """Score ``folder`` in this process; peak and baseline memory in bytes."""
    import numpy as np

    from medtransfer.scoring import score_folder

    predictor = _tiny_keras_predictor(batch) if predictor_kind == "keras" else StandInPredictor()
    predictor.predict([np.zeros((64, 64), np.float32)] * batch)  # warm up, allocate once
    gc.collect()
    sampler = PeakRss()
    baseline = sampler.current()
    started = time.perf_counter()
    with sampler:
        summary = score_folder(
            folder, predictor, out, workers=workers, batch_size=batch, progress=False
        )
    seconds = time.perf_counter() - started
    kib = 1024  # ru_maxrss is in KiB on Linux
    return {
        "files": summary.n_files,
        "ok": summary.n_ok,
        "seconds": seconds,
        "baseline": baseline,
        "peak": sampler.peak,
        "peak_main": sampler.peak_main,
        "peak_children": sampler.peak_children,
        "maxrss_main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib,
    }


def _tiny_keras_predictor(batch: int):
    """One convolution, pooling and a softmax through ``KerasPredictor``: the real prediction
    path (resize in TensorFlow, the model call) at a cost that leaves scoring in front."""
    import keras

    from medtransfer.predictor import KerasPredictor, ModelInfo

    model = keras.Sequential(
        [
            keras.Input((64, 64, 1)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(len(CLASSES), activation="softmax"),
        ]
    )
    info = ModelInfo("tiny", "binary", CLASSES, CLASSES[1], (64, 64), 1, "dicom", "first")
    return KerasPredictor(model, info, batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1_000, help="files in the small folder")
    parser.add_argument("--large", type=int, default=10_000, help="files in the large folder")
    parser.add_argument("--pixels", type=int, default=64, help="rows = columns of each file")
    parser.add_argument("--predictor", choices=("keras", "stand-in"), default="keras")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    options = (args.predictor, args.workers, args.batch_size)
    if args.child:
        print(json.dumps(measure(Path(args.child[0]), Path(args.child[1]), *options)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (args.small, args.large):
            folder = Path(tmp) / f"in{n}"
            started = time.perf_counter()
            write_dicoms(folder, n, args.pixels, seed=n)
            print(f"wrote {n} files in {time.perf_counter() - started:.1f} s", flush=True)
            child = [sys.executable, __file__, "--child", str(folder), f"{folder}.csv"]
            child += ["--predictor", args.predictor, "--workers", str(args.workers)]
            child += ["--batch-size", str(args.batch_size)]
            run = subprocess.run(child, capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"scoring {n} files failed:\n{run.stderr}")
            results[n] = json.loads(run.stdout.splitlines()[-1])
            assert results[n]["ok"] == n, results[n]

    print(
        f"\n{args.pixels}x{args.pixels} DICOM, predictor {args.predictor}, workers "
        f"{args.workers}, batch {args.batch_size}; MB = 2^20 bytes"
    )
    columns = {
        "seconds": "scoring s",
        "baseline": "baseline MB",
        "peak": "peak sum MB",
        "added": "peak - base",
        "peak_main": "main MB",
        "peak_children": "children MB",
        "maxrss_main": "main maxrss",
    }
    print(f"{'files':>8}" + "".join(f"{title:>14}" for title in columns.values()))
    for n, r in results.items():
        r["added"] = r["peak"] - r["baseline"]
        cells = [f"{r['seconds']:.1f}"] + [f"{r[key] / MB:.1f}" for key in list(columns)[1:]]
        print(f"{n:>8}" + "".join(f"{cell:>14}" for cell in cells))
    small, large = results[args.small], results[args.large]
    print(f"ratio peak sum {args.large} / {args.small}: {large['peak'] / small['peak']:.3f}")
    print(f"ratio peak - baseline: {large['added'] / small['added']:.3f}")


if __name__ == "__main__":
    main()
