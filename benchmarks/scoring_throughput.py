"""Scoring throughput: decode pool (workers=2) vs in-process decoding, in the same run.

Scores the 39 real DICOM files of ../shared/data/dicom/corpus (JPEG 2000 radiographs up to
2500x2048, JPEG-LS, RLE, ...) with a randomly initialised ResNet50 at 224 px, repeated ``--repeat``
times by symlinking the corpus. Prints files/s for each setting and their ratio: the pool must
beat in-process decoding, or prediction is waiting on the GIL. Run with `make bench`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import bench_predictor, link_corpus

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus to score")
    args = parser.parse_args()

    from medtransfer.scoring import score_folder

    predictor = bench_predictor("resnet50", 224)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        link_corpus(folder, args.repeat)
        rates = {}
        for workers in (0, 2):
            started = time.perf_counter()
            summary = score_folder(
                folder, predictor, Path(tmp) / f"w{workers}.csv", workers=workers, progress=False
            )
            seconds = time.perf_counter() - started
            rates[workers] = summary.n_files / seconds
            print(
                f"workers={workers}: {summary.n_ok} ok, {summary.n_error} errors, "
                f"{seconds:.1f} s, {rates[workers]:.2f} files/s"
            )
    print(f"ratio pool/in-process: {rates[2] / rates[0]:.2f}x (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
