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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the corpus to score")
    args = parser.parse_args()

    from medtransfer.models.build import build_model
    from medtransfer.predictor import KerasPredictor, ModelInfo
    from medtransfer.scoring import score_folder
    from medtransfer.spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "bench",
            "task": "binary",
            "classes": ["a", "b"],
            "data": {"format": "folders", "path": str(CORPUS)},
            "image": {"size": [224, 224], "channels": 1},
            "model": {"backbone": "resnet50", "weights": "none"},
        }
    )
    info = ModelInfo("bench", "binary", ["a", "b"], "b", (224, 224), 1, "dicom", "first")
    predictor = KerasPredictor(build_model(spec), info)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        for copy in range(args.repeat):
            target = folder / f"copy{copy}"
            target.mkdir(parents=True)
            for file in CORPUS.iterdir():
                (target / file.name).symlink_to(file)
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
