"""OOD detection (issue 19): does ``ood_score`` tell a model's own kind of image from others,
and does ``medtransfer monitor`` see a batch from another scanner?

Takes a finished run (``--run``; ``make bench`` trains the BreastMNIST default recipe first)
and scores, through ``load_predictor(run).predict_with_ood`` (what ``medtransfer score`` uses):

- in distribution: the run's own test images (BreastMNIST test split, 156 ultrasound images);
- far OOD: every decodable image of ../shared/data/dicom/corpus and of pydicom's test files
  (CT, MR, radiographs, US, secondary captures);
- near OOD: the test images of the other MedMNIST sets in ../shared/data/medmnist
  (PneumoniaMNIST chest radiographs, RetinaMNIST fundus photographs);
- site shift: the same BreastMNIST test images through ``medtransfer.data.site_shift``'s
  simulated second scanner (lower resolution, another tone curve, more noise).

For each group: the AUROC of ``ood_score`` separating it from the in-distribution test images,
and the share of each group flagged at the default threshold (at or above the 99th percentile
of the validation images' scores) and at the 95th. The same AUROCs for the score the toolkit
used before stages were tapped (one Mahalanobis distance on the head's input, fitted here on the
same run's training images) are the baseline, measured in the same run.

Then the monitor, as an operator runs it: the test images and their site-shifted copies are
written as PNG folders, scored with ``medtransfer score`` and compared with ``medtransfer
monitor`` (default thresholds); printed: each check's PSI, p-value and alarm per batch.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_DISTRIBUTION = "in distribution: BreastMNIST test"
SITE_SHIFT = "site shift: BreastMNIST test, second scanner"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a finished run directory (BreastMNIST)")
    args = parser.parse_args()

    import numpy as np

    from medtransfer.data.site_shift import acquisition_shift

    breast = _medmnist("breastmnist", "test")
    groups = {
        IN_DISTRIBUTION: breast,
        "far: DICOM corpus + pydicom test files": _dicom_images(),
        "near: PneumoniaMNIST test": _medmnist("pneumoniamnist", "test"),
        "near: RetinaMNIST test": _medmnist("retinamnist", "test"),
        SITE_SHIFT: [acquisition_shift(image, seed=i) for i, image in enumerate(breast)],
    }
    detectors = _detectors(args.run)
    print(f"run {args.run}; {len(detectors['stages'].ood_validation)} validation scores\n")
    print(f"{'group':<48}{'n':>6}{'AUROC':>8}{'p99':>8}{'p95':>8}{'AUROC head only':>17}")
    scored = {name: _scores(predictor, groups) for name, predictor in detectors.items()}
    for name in groups:
        stages, head = scored["stages"][name], scored["head input only"][name]
        flagged = detectors["stages"].percentiles(stages)
        row = f"{name:<48}{len(stages):>6}"
        if name == IN_DISTRIBUTION:
            row += f"{'':>8}{np.mean(flagged >= 99):>8.1%}{np.mean(flagged >= 95):>8.1%}"
        else:
            inside = (scored["stages"][IN_DISTRIBUTION], scored["head input only"][IN_DISTRIBUTION])
            row += f"{_auroc(inside[0], stages):>8.3f}"
            row += f"{np.mean(flagged >= 99):>8.1%}{np.mean(flagged >= 95):>8.1%}"
            row += f"{_auroc(inside[1], head):>17.3f}"
        print(row)
    print()
    _monitor(args.run, {"unshifted": groups[IN_DISTRIBUTION], "shifted": groups[SITE_SHIFT]})


class _Scorer:
    """A predictor and the validation scores its percentiles are read against."""

    def __init__(self, predictor) -> None:
        self.predictor = predictor
        self.ood_validation = predictor.ood_validation

    def percentiles(self, values):
        from medtransfer.scope import percentiles

        return percentiles(values, self.ood_validation)


def _detectors(run_dir: str) -> dict[str, _Scorer]:
    """The run's own OOD score, and the head-input-only score fitted on the same images."""
    import keras
    import numpy as np

    from medtransfer.models import ood
    from medtransfer.models.inputs import to_model_input
    from medtransfer.predictor import KerasPredictor, load_predictor

    predictor = load_predictor(run_dir)
    model, info = predictor.model, predictor.info
    features = keras.Model(model.input, ood.pooled_features(model))

    def pooled(split: str) -> np.ndarray:
        images = to_model_input(_medmnist("breastmnist", split), info.image_size, info.channels)
        return features.predict(images, batch_size=64, verbose=0).astype(np.float64)

    mean, precision = ood.fit_reference(pooled("train"))
    centred = pooled("val") - mean
    validation = np.sqrt(np.einsum("nd,de,ne->n", centred, precision, centred))
    head_only = {"mean": mean, "precision": precision, "validation_scores": np.sort(validation)}
    return {
        "stages": _Scorer(predictor),
        "head input only": _Scorer(KerasPredictor(model, info, ood_reference=head_only)),
    }


def _scores(scorer: _Scorer, groups: dict[str, list]) -> dict:
    import numpy as np

    def one(images: list) -> np.ndarray:
        parts = [scorer.predictor.predict_with_ood(images[i : i + 64])[1]
                 for i in range(0, len(images), 64)]  # fmt: skip
        return np.concatenate(parts)

    return {name: one(images) for name, images in groups.items()}


def _monitor(run_dir: str, batches: dict[str, list]) -> None:
    """PNG folders -> ``medtransfer score`` -> ``medtransfer monitor``, as an operator would."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    cli = [sys.executable, "-m", "medtransfer.cli"]
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        tables = []
        for name, images in batches.items():
            (root / name).mkdir()
            for i, image in enumerate(images):
                pixels = np.clip(np.rint(np.asarray(image) * 255), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / name / f"{i:04d}.png")
            table = root / "scores" / name / "scores.csv"
            subprocess.run([*cli, "score", str(root / name), "--model", run_dir,
                            "--out", str(table)], check=True, capture_output=True)  # fmt: skip
            tables.append(str(table))
        out = root / "monitor"
        done = subprocess.run([*cli, "monitor", *tables, "--model", run_dir, "--out", str(out)],
                              capture_output=True, text=True)  # fmt: skip
        findings = pd.read_csv(out / "monitor.csv", keep_default_na=False)
    print(f"medtransfer monitor (default thresholds): exit code {done.returncode}")
    shown = findings[findings["n"] > 0][["batch", "check", "n", "value", "psi", "p_value", "alarm"]]
    numbers = {c: pd.to_numeric(shown[c], errors="coerce") for c in ("value", "psi", "p_value")}
    shown = shown.assign(**numbers)
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))


def _medmnist(name: str, split: str) -> list:
    import numpy as np

    with np.load(SHARED / "medmnist" / f"{name}.npz") as archive:
        return list(archive[f"{split}_images"].astype(np.float32) / 255.0)


def _dicom_images() -> list:
    from pydicom.data import get_testdata_files

    from medtransfer.io import ImageReadError, load_image

    files = sorted((SHARED / "dicom" / "corpus").glob("*.dcm"))
    files += [Path(f) for f in get_testdata_files("*.dcm")]
    images = []
    for file in files:
        try:
            images.append(load_image(file).pixels)
        except (ImageReadError, ValueError):
            continue
    return images


def _auroc(inside, outside) -> float:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return roc_auc_score(labels, np.r_[inside, outside])


if __name__ == "__main__":
    main()
