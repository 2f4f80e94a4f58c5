"""Decode throughput: the shared folder engine's spawn pool vs one process, in the same run.

Inspects (fully decodes, as ``medtransfer inspect`` does) the 39 real DICOM files of
../shared/data/dicom/corpus (JPEG 2000 radiographs up to 2500x2048, JPEG-LS, RLE, ...), repeated
``--repeat`` times by symlinking the corpus, in-process and with ``--workers`` decode processes,
alternating for ``--rounds`` rounds. No model is involved, so this isolates decoding: the ratio
says what the pool buys on this machine; scoring_throughput.py measures the same pool overlapped
with prediction.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import link_corpus

from medtransfer.inspect import inspect_folder


def files_per_second(folder: Path, out: Path, workers: int) -> float:
    started = time.perf_counter()
    summary = inspect_folder(folder, out, workers=workers, progress=False)
    seconds = time.perf_counter() - started
    status = ", ".join(f"{n} {s}" for s, n in sorted(summary.by_status.items()))
    rate = summary.n_files / seconds
    print(f"workers={workers}: {status}, {seconds:.1f} s, {rate:.2f} files/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus to decode")
    parser.add_argument("--workers", type=int, default=2, help="decode processes in the pool")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per setting")
    args = parser.parse_args()
    rates: dict[int, list[float]] = {0: [], args.workers: []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        link_corpus(folder, args.repeat)
        inspect_folder(folder, Path(tmp) / "warm.csv", workers=0, progress=False)  # page cache
        # Alternating settings and keeping each one's best run spreads a burst of load from
        # other processes over both settings instead of charging it to one.
        for _ in range(args.rounds):
            for workers, runs in rates.items():
                runs.append(files_per_second(folder, Path(tmp) / f"w{workers}.csv", workers))
    alone, pool = max(rates[0]), max(rates[args.workers])
    print(f"best: in-process {alone:.2f} files/s, pool {pool:.2f} files/s")
    print(f"ratio pool/in-process: {pool / alone:.2f}x (cores: {os.cpu_count()})")


if __name__ == "__main__":
    main()
