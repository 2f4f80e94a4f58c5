"""Cold loads (no decode-once cache): medtransfer's decode pool vs one process vs MONAI's loader.

The files are the real DICOM corpus (../shared/data/dicom/corpus: JPEG 2000 radiographs up to
2500x2048, JPEG-LS, JPEG lossless, RLE, colour and multi-frame files) without its 2-frame RGB
file, ``--repeat`` times, loaded at 224 px, one channel:

- medtransfer ``load_images(use_cache=False)`` with ``workers=0`` (in process) and ``workers=2``
  (the spawn pool), on every file: the full pipeline (rescale, VOI window, MONOCHROME1, frame
  policy, channels, the model's antialiased resize);
- MONAI 1.6 ``LoadImage(PydicomReader)`` + ``DataLoader`` with 2 workers and with 0 (see
  benchmarks/monai_loader.py: min-max scaling, MONAI's default resize), in a virtualenv this
  script creates (``$MEDTRANSFER_BENCH_VENVS``, default ~/.cache/medtransfer/bench-venvs; not a
  project dependency: ``torch==2.13.0`` there is the CPU build these machines keep on disk,
  elsewhere pip may fetch a CUDA build of several GB), with the codec versions of our lock;
- medtransfer's pool again on exactly the files MONAI's 2-D pipeline takes (colour and
  multi-frame files become 3-D arrays its ``Resize`` refuses): the like-for-like comparison.

Arms alternate for ``--rounds`` rounds (the machine is shared and noisy); the ratios printed are
medians of per-round ratios. Loader start-up is timed in every arm (spawning the pool, forking
MONAI's workers); importing the libraries is not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import CORPUS

REPO = Path(__file__).resolve().parents[1]
EXCLUDED = "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm"  # 2-frame RGB: excluded, as in issue 18
VENVS = Path(
    os.environ.get(
        "MEDTRANSFER_BENCH_VENVS", Path.home() / ".cache" / "medtransfer" / "bench-venvs"
    )
)
MONAI = "monai==1.6.1"
CODECS = ("numpy", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg")
CODECS += ("pylibjpeg-rle", "pyjpegls")


def monai_python() -> Path:
    """The MONAI virtualenv's interpreter, creating the virtualenv on first use."""
    venv = VENVS / "monai-1.6"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    pins = (REPO / "requirements.lock").read_text().splitlines()
    codecs = [pin for pin in pins if pin.split("==")[0] in CODECS]
    print(f"creating {venv} ({MONAI}, torch 2.13.0 CPU, {' '.join(codecs)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, MONAI, *codecs], check=True)
    return python


def monai_run(python: Path, files: list[str], workers: int, repeat: int) -> float:
    """Seconds MONAI's loader takes for ``files`` x ``repeat``."""
    command = [str(python), str(Path(__file__).with_name("monai_loader.py")), *files]
    command += ["--workers", str(workers), "--repeat", str(repeat)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["files"] == len(files) * repeat, result
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=6, help="copies of the corpus per load")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per arm")
    parser.add_argument("--workers", type=int, default=2, help="processes in either pool")
    args = parser.parse_args()

    import pandas as pd

    from medtransfer.data.pipeline import load_images

    files = [str(p) for p in sorted(CORPUS.glob("*.dcm")) if p.name != EXCLUDED]
    python = monai_python()
    probe = [str(python), str(Path(__file__).with_name("monai_loader.py")), "--probe", *files]
    shared = json.loads(subprocess.run(probe, capture_output=True, text=True, check=True).stdout)
    print(f"{len(files)} files; MONAI's 2-D pipeline takes {len(shared)} of them", flush=True)

    def ours(paths: list[str], workers: int) -> Callable[[], float]:
        rows = pd.DataFrame({"path": paths * args.repeat})

        def load() -> float:
            started = time.perf_counter()
            images = load_images(rows, (224, 224), 1, workers=workers, use_cache=False)
            seconds = time.perf_counter() - started
            assert images.shape == (len(rows), 224, 224, 1)
            return seconds

        return load

    arms: dict[str, tuple[int, Callable[[], float]]] = {
        "medtransfer, in process (workers=0)": (len(files), ours(files, 0)),
        f"medtransfer, pool (workers={args.workers})": (len(files), ours(files, args.workers)),
        f"medtransfer, pool, MONAI's {len(shared)} files": (
            len(shared),
            ours(shared, args.workers),
        ),
        f"MONAI DataLoader ({args.workers} workers), same files": (
            len(shared),
            lambda: monai_run(python, shared, args.workers, args.repeat),
        ),
        "MONAI DataLoader (0 workers), same files": (
            len(shared),
            lambda: monai_run(python, shared, 0, args.repeat),
        ),
    }
    ours(files, 0)()  # the page cache, for every arm alike
    rates: dict[str, list[float]] = {name: [] for name in arms}
    for round_ in range(args.rounds):
        for name, (n, load) in arms.items():
            rates[name].append(n * args.repeat / load())
        print(
            f"round {round_ + 1}: " + ", ".join(f"{r[-1]:.1f}" for r in rates.values()), flush=True
        )
    _report(args, rates)


def _report(args: argparse.Namespace, rates: dict[str, list[float]]) -> None:
    names = list(rates)
    print(f"\nfiles/s, corpus x{args.repeat}, 224 px, {args.rounds} rounds, {os.cpu_count()} cores")
    for name, runs in rates.items():
        each = " ".join(f"{r:.1f}" for r in runs)
        print(f"{name:<48}median {statistics.median(runs):6.1f}  ({each})")
    for label, top, bottom in (
        ("pool / in process", names[1], names[0]),
        ("pool / MONAI with the same workers, same files", names[2], names[3]),
        ("MONAI: its workers / none", names[3], names[4]),
    ):
        ratios = [a / b for a, b in zip(rates[top], rates[bottom], strict=True)]
        each = " ".join(f"{r:.2f}" for r in ratios)
        print(f"{label}: {statistics.median(ratios):.2f}x  ({each})")


if __name__ == "__main__":
    main()
