"""Scoring vs the bare model: does ``score_folder`` hide decoding behind the network?

Writes ``--files`` uncompressed 512x512 DICOM radiographs (16-bit MONOCHROME2, Explicit VR Little
Endian, a DX header) and scores them with ``score_folder(workers=2, batch_size=32)`` (as the CLI
does: uncompressed files decoded in the main process while that is cheap) through a
``KerasPredictor`` over ``build_model`` (EfficientNetB0 at 224 px, random initialisation: a real
backbone, so on a CPU the network is the bottleneck, as at a hospital site). The baseline is the
same model's ``model.predict(batch_size=32)`` on the same images, already decoded, resized and in
memory: the network alone. Target (issue 18): scoring / bare >= 0.95, median of rounds.

``model.predict`` itself is bimodal here: in about half the calls of a process it runs at half
speed (49 instead of 88 images/s, seen in repeated fresh processes, while the compiled call of
the predictor arm stays at ~90). A slow baseline would flatter scoring, so "bare" is the faster
of two ``model.predict`` calls in each round, and scoring / predictor is printed beside it.

A third arm separates the two possible losses: the same in-memory images through the predictor
(``KerasPredictor.predict_with_ood``, as scoring calls it: resize + its model call, no files,
no pool). scoring / predictor is what the folder pipeline costs (decoding, transport, CSV);
predictor / bare is what the predictor's way of calling the model costs. A fourth arm scores
with ``decode_here=False`` (``--pool-only``): every file decoded in the workers and shipped to
the main process.

The model and the resize are warmed up once before timing; then the arms alternate for
``--rounds`` rounds. Scoring is timed end to end, spawning its decode pool included (a real run
pays it); the wait for its first batch (pool start-up + decoding 32 files) is printed apart, with
the rate after it ("steady"), which is what a long archive run sees.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import bench_predictor, write_dicoms

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


ARMS = {
    "bare": "bare model.predict, faster of 2 (in memory)",
    "predictor": "KerasPredictor.predict_with_ood (decoded, in memory)",
    "scoring": "score_folder (files, end to end)",
    "steady": "score_folder after its first batch",
    "pool": "score_folder --pool-only (files, end to end)",
}


class _FirstCallClock:
    """Wraps a predictor and notes when scoring first calls it."""

    def __init__(self, predictor) -> None:
        self._predictor = predictor
        self.first_call: float | None = None

    def __getattr__(self, name: str):
        return getattr(self._predictor, name)

    def predict_with_ood(self, images, tabular=None):  # what scoring calls
        if self.first_call is None:
            self.first_call = time.perf_counter()
        return self._predictor.predict_with_ood(images, tabular)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=256, help="DICOM files to score")
    parser.add_argument("--pixels", type=int, default=512, help="rows = columns of each file")
    parser.add_argument("--backbone", default="efficientnetb0")
    parser.add_argument("--size", type=int, default=224, help="model input size (square)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="scoring's decode processes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm")
    args = parser.parse_args()

    from medtransfer.folder_pool import crawl
    from medtransfer.io import load_image
    from medtransfer.models.inputs import to_model_input
    from medtransfer.scoring import score_folder

    n, batch = args.files, args.batch_size
    predictor = bench_predictor(args.backbone, args.size, batch)
    model = predictor.model
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        started = time.perf_counter()
        write_dicoms(folder, n, args.pixels)
        written = time.perf_counter() - started
        print(f"wrote {n} files of {args.pixels}x{args.pixels} in {written:.1f} s")
        images = [load_image(folder / rel).pixels for rel in crawl(folder)]
        x = to_model_input(images, (args.size, args.size), 1)
        model.predict(x[:batch], batch_size=batch, verbose=0)  # trace and allocate once
        predictor.predict(images[:batch])

        def bare() -> None:
            model.predict(x, batch_size=batch, verbose=0)

        def best_bare() -> float:
            return min(_timed(bare), _timed(bare))

        def in_memory() -> None:
            for i in range(0, n, batch):
                predictor.predict_with_ood(images[i : i + batch])

        def scoring(decode_here: bool = True) -> tuple[float, float]:
            """Seconds end to end, and of those the wait for the first batch."""
            clock = _FirstCallClock(predictor)
            start = time.perf_counter()
            summary = score_folder(
                folder,
                clock,
                Path(tmp) / "scores.csv",
                workers=args.workers,
                batch_size=batch,
                progress=False,
                decode_here=decode_here,
            )
            seconds = time.perf_counter() - start
            assert summary.n_ok == n, summary
            return seconds, clock.first_call - start

        seconds: dict[str, list[float]] = {name: [] for name in ARMS}
        waits: list[float] = []
        for round_ in range(args.rounds):
            seconds["bare"].append(best_bare())
            seconds["predictor"].append(_timed(in_memory))
            total, wait = scoring()
            seconds["scoring"].append(total)
            seconds["steady"].append(total - wait)
            waits.append(wait)
            seconds["pool"].append(scoring(decode_here=False)[0])
            now = ", ".join(f"{name} {n / runs[-1]:.1f}" for name, runs in seconds.items())
            print(f"round {round_ + 1} files/s: {now}; first batch after {wait:.2f} s")

    rates = {name: [n / s for s in runs] for name, runs in seconds.items()}
    print(
        f"\n{n} files {args.pixels}x{args.pixels}, {args.backbone} at {args.size} px, "
        f"batch {batch}, workers {args.workers}, {args.rounds} rounds, {os.cpu_count()} cores"
    )
    print(f"{'arm':<52}{'best files/s':>13}  ratio to bare: median (per round)")
    for name, label in ARMS.items():
        print(f"{label:<52}{max(rates[name]):>13.1f}  {_ratio(rates[name], rates['bare'])}")
    pipeline = _ratio(rates["scoring"], rates["predictor"])
    print(f"scoring / predictor (what the folder pipeline costs): {pipeline}")
    print(
        f"scoring's wait for its first batch (pool start-up + decoding one batch): median "
        f"{statistics.median(waits):.2f} s of {statistics.median(seconds['scoring']):.1f} s"
    )


def _timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _ratio(rates: list[float], baselines: list[float]) -> str:
    """Median of the per-round ratios, then each round's."""
    ratios = [r / b for r, b in zip(rates, baselines, strict=True)]
    return f"{statistics.median(ratios):.2f} ({' '.join(f'{v:.2f}' for v in ratios)})"


if __name__ == "__main__":
    main()
