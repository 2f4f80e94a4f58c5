"""Ray scoring (issue 20): ``medtransfer score --engine ray`` in local mode against the local
decode pool on the same folder, in the same run, and how Ray's rate grows with decode actors.

Every arm is the real CLI in a fresh process, as an operator runs it, on the same folder (the
shared DICOM corpus copied ``--copies`` times) and the same model (``--model``, default the
BreastMNIST run ``make bench`` trains). Each arm also scores a one-file folder: its time is the
fixed cost (process start, Ray start-up, actors loading the model), and (files - 1) / (time -
fixed) is the steady rate, what a long archive job sees and what a node of a cluster adds.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLI = Path(sys.executable).with_name("medtransfer")
RAY = ["--engine", "ray", "--ray-models", "1", "--ray-decoders"]
ARMS = {
    "local pool, 2 workers": ["--workers", "2"],
    "ray, 1 decoder + 1 model actor": [*RAY, "1"],
    "ray, 2 decoders + 1 model actor": [*RAY, "2"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="benchmarks/out/ood_breast")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        for copy in range(args.copies):
            shutil.copytree(SHARED / "dicom" / "corpus", root / "many" / f"copy{copy}")
        one = root / "one"
        one.mkdir()
        shutil.copy(sorted((SHARED / "dicom" / "corpus").glob("*.dcm"))[0], one)
        files = sum(1 for p in (root / "many").rglob("*") if p.is_file())
        print(f"{files} files, model {args.model}, {args.rounds} rounds (best of)\n")
        print(f"{'arm':<36}{'wall s':>8}{'fixed s':>9}{'files/s':>9}{'steady files/s':>16}")
        steady = {}
        for name, options in ARMS.items():
            wall = min(
                _seconds(root / "many", root, args.model, options) for _ in range(args.rounds)
            )
            fixed = min(_seconds(one, root, args.model, options) for _ in range(args.rounds))
            steady[name] = (files - 1) / (wall - fixed)
            print(f"{name:<36}{wall:>8.1f}{fixed:>9.1f}{files / wall:>9.2f}{steady[name]:>16.2f}")
        base = steady["local pool, 2 workers"]
        print("\nsteady rate / local pool: " + ", ".join(
            f"{name}: {rate / base:.2f}" for name, rate in steady.items()))  # fmt: skip


def _seconds(folder: Path, root: Path, model: str, options: list[str]) -> float:
    out = root / "scores.csv"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    done = subprocess.run(
        [str(CLI), "score", str(folder), "--model", model, "--out", str(out), "--no-progress",
         *options], capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        raise SystemExit(f"{options}: exit {done.returncode}\n{done.stderr[-2000:]}")
    return seconds


if __name__ == "__main__":
    main()
