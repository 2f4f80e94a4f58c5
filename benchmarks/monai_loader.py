"""MONAI's side of load_vs_monai.py; runs in the benchmark's own MONAI virtualenv, never in ours.

What a MONAI user writes to load a folder of DICOM radiographs for a 224 px 2D model:
``LoadImage(PydicomReader)`` -> ``EnsureChannelFirst`` -> ``ScaleIntensity`` (min-max to
[0, 1]; no VOI window, no MONOCHROME1 inversion) -> ``Resize((224, 224))`` (MONAI's default
``area`` mode), in a ``monai.data.Dataset`` behind a ``DataLoader``.

``--probe`` prints (as JSON) which files the pipeline loads: colour and multi-frame files come
out as 3-D arrays that a 2-D ``Resize`` refuses, so the comparison runs on the files both
loaders take. Otherwise it loads the files ``--repeat`` times with ``--workers`` loader
processes and prints {"files": n, "seconds": s}, timed from creating the loader (its worker
start-up included, as medtransfer's pool start-up is) to the last batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings


def pipeline(size: int):
    from monai.data import PydicomReader
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    return Compose(
        [
            LoadImage(reader=PydicomReader(), image_only=True),
            EnsureChannelFirst(),
            ScaleIntensity(),
            Resize((size, size)),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("files", nargs="+")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from monai.data import DataLoader, Dataset

    transform = pipeline(args.size)
    if args.probe:
        loads = []
        for path in args.files:
            try:
                transform(path)
            except Exception:  # a file MONAI's 2-D pipeline cannot take
                continue
            loads.append(path)
        json.dump(loads, sys.stdout)
        return
    files = args.files * args.repeat
    started = time.perf_counter()
    loader = DataLoader(
        Dataset(data=files, transform=transform),
        batch_size=args.batch_size,
        num_workers=args.workers,
    )
    n = sum(len(batch) for batch in loader)
    seconds = time.perf_counter() - started
    json.dump({"files": n, "seconds": seconds}, sys.stdout)


if __name__ == "__main__":
    main()
