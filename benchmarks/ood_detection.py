"""OOD detection (issue 19): does ``ood_score`` tell a model's own kind of image from others?

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
of the validation images' scores) and at the 95th.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True, help="a finished run directory (BreastMNIST)")
    args = parser.parse_args()

    import numpy as np
    from pydicom.data import get_testdata_files
    from sklearn.metrics import roc_auc_score

    from medtransfer.data.site_shift import acquisition_shift
    from medtransfer.io import ImageReadError, load_image
    from medtransfer.predictor import load_predictor
    from medtransfer.scope import percentiles

    predictor = load_predictor(args.run)

    def scores(images: list) -> np.ndarray:
        return np.concatenate(
            [predictor.predict_with_ood(images[i : i + 64])[1] for i in range(0, len(images), 64)]
        )

    def medmnist(name: str) -> list:
        with np.load(SHARED / "medmnist" / f"{name}.npz") as archive:
            return list(archive["test_images"].astype(np.float32) / 255.0)

    def dicom_images() -> list:
        files = sorted((SHARED / "dicom" / "corpus").glob("*.dcm"))
        files += [Path(f) for f in get_testdata_files("*.dcm")]
        images = []
        for file in files:
            try:
                images.append(load_image(file).pixels)
            except (ImageReadError, ValueError):
                continue
        return images

    breast = medmnist("breastmnist")
    groups = {
        "in distribution: BreastMNIST test": breast,
        "far: DICOM corpus + pydicom test files": dicom_images(),
        "near: PneumoniaMNIST test": medmnist("pneumoniamnist"),
        "near: RetinaMNIST test": medmnist("retinamnist"),
        "site shift: BreastMNIST test, second scanner": [
            acquisition_shift(image, seed=i) for i, image in enumerate(breast)
        ],
    }
    reference = predictor.ood_validation
    scored = {name: scores(images) for name, images in groups.items()}
    inside = scored["in distribution: BreastMNIST test"]
    print(f"run {args.run}; {len(reference)} validation scores as the reference\n")
    print(f"{'group':<48}{'n':>6}{'AUROC':>8}{'flagged p99':>13}{'flagged p95':>13}")
    for name, values in scored.items():
        flagged = percentiles(values, reference)
        auroc = "" if values is inside else f"{_auroc(roc_auc_score, inside, values):.3f}"
        print(
            f"{name:<48}{len(values):>6}{auroc:>8}"
            f"{np.mean(flagged >= 99):>13.1%}{np.mean(flagged >= 95):>13.1%}"
        )


def _auroc(roc_auc_score, inside, outside) -> float:
    import numpy as np

    labels = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return roc_auc_score(labels, np.r_[inside, outside])


if __name__ == "__main__":
    main()
