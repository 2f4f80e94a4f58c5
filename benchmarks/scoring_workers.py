"""Scoring the compressed corpus: two decode workers vs one, in the same run (target >= 1.6x).

Scores the 39 real DICOM files of ../shared/data/dicom/corpus (JPEG 2000 radiographs up to
2500x2048, JPEG-LS, RLE, ...), repeated ``--repeat`` times by symlinking the corpus, with
``score_folder(workers=1)`` and ``score_folder(workers=2)`` (the CLI's ``--workers 1`` and
``--workers 2``, batch 16 as its default). The predictor is a stand-in without a network (one
mean per image, no TensorFlow): decoding is the whole work, so the ratio is what the second worker
buys on this machine. scoring_throughput.py measures the pool against decoding in the main
process with ResNet50 predicting. After one warm-up pass (page cache) the two settings alternate
for ``--rounds`` rounds; each run includes spawning its pool. Prints the best of each, and the
median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from resource import RUSAGE_CHILDREN, RUSAGE_SELF, getrusage

from _common import StandInPredictor, link_corpus

from medtransfer.scoring import score_folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=4, help="copies of the corpus to score")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per setting")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    predictor = StandInPredictor()
    rates: dict[int, list[float]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        link_corpus(folder, args.repeat)

        def files_per_second(workers: int) -> float:
            out = Path(tmp) / f"w{workers}.csv"
            main_before, workers_before = _cpu_seconds()
            started = time.perf_counter()
            summary = score_folder(
                folder, predictor, out, workers=workers, batch_size=args.batch_size, progress=False
            )
            seconds = time.perf_counter() - started
            main_after, workers_after = _cpu_seconds()
            main_cpu, workers_cpu = main_after - main_before, workers_after - workers_before
            rate = summary.n_files / seconds
            print(
                f"workers={workers}: {summary.n_ok} ok, {summary.n_error} errors, "
                f"{seconds:.1f} s, {rate:.2f} files/s; CPU s: main {main_cpu:.1f}, "
                f"workers {workers_cpu:.1f}; load average {os.getloadavg()[0]:.1f}"
            )
            return rate

        files_per_second(2)  # warm-up: page cache
        for _ in range(args.rounds):
            for workers, runs in rates.items():
                runs.append(files_per_second(workers))

    ratios = [two / one for one, two in zip(rates[1], rates[2], strict=True)]
    print(f"\n{len(ratios)} rounds, {os.cpu_count()} cores")
    print(f"{'setting':<12}{'best files/s':>14}")
    for workers, runs in rates.items():
        print(f"{f'workers={workers}':<12}{max(runs):>14.2f}")
    per_round = " ".join(f"{r:.2f}" for r in ratios)
    print(f"ratio workers=2 / workers=1, best of each: {max(rates[2]) / max(rates[1]):.2f}x")
    print(f"ratio workers=2 / workers=1, median: {statistics.median(ratios):.2f}x ({per_round})")


def _cpu_seconds() -> tuple[float, float]:
    """CPU time of this process and of its finished children (the pool's workers are joined
    when ``score_folder`` returns). With the wall time it tells a busy machine from a bottleneck:
    two workers can only double the rate if the main process's share stays small."""
    main, children = (getrusage(who) for who in (RUSAGE_SELF, RUSAGE_CHILDREN))
    return main.ru_utime + main.ru_stime, children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
