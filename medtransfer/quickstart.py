"""The embedded demo: generate a DICOM dataset, then train, evaluate, export and score it.

It needs no network and no data outside the package, so ``make demo`` shows the whole pipeline
on any machine in minutes. Weights are random (``none``): ImageNet weights cannot be assumed to
be downloadable, and the synthetic finding is learnable from scratch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from medtransfer.scoring import ScoreSummary

DEFAULTS = {"epochs": 15, "n_patients": 160, "backbone": "resnet50", "image_size": 128}


@dataclass(frozen=True)
class QuickstartResult:
    spec: Path
    run_dir: Path
    report_dir: Path
    export_dir: Path
    scores: Path
    test_auroc: float
    scoring: ScoreSummary
    seconds: float

    def summary(self) -> str:
        return "\n".join(
            [
                f"quickstart finished in {self.seconds:.0f} s",
                f"  test AUROC (held-out patients): {self.test_auroc:.4f}",
                f"  data spec:      {self.spec}",
                f"  run directory:  {self.run_dir}",
                f"  report:         {self.report_dir} (report.html, metrics.json, gradcam.png)",
                f"  SavedModel:     {self.export_dir}",
                f"  scores:         {self.scores} ({self.scoring.n_ok} ok, "
                f"{self.scoring.n_error} errors)",
            ]
        )


def write_spec(manifest: Path, *, backbone: str, epochs: int, image_size: int, seed: int) -> Path:
    """The demo's data spec, next to its manifest, as a user would write it."""
    spec = {
        "name": "quickstart",
        "task": "binary",
        "classes": ["normal", "finding"],
        "positive_class": "finding",
        "data": {
            "format": "manifest",
            "path": manifest.name,
            "image_column": "path",
            "label_columns": ["label"],
            "patient_column": "patient_id",
            "site_column": "site",
        },
        "split": {"val": 0.2, "test": 0.25, "seed": seed},
        "image": {"size": [image_size, image_size], "channels": 1, "window": "dicom"},
        "model": {"backbone": backbone, "weights": "none", "dropout": 0.2},
        "training": {"epochs": epochs, "batch_size": 16, "learning_rate": 0.001, "seed": seed},
    }
    path = manifest.parent / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_quickstart(
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    n_patients: int | None = None,
    backbone: str | None = None,
    image_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> QuickstartResult:
    """Run the whole pipeline into ``out_dir`` (data/, run/, report/, export/, scores.csv)."""
    from medtransfer.evaluation.report import evaluate
    from medtransfer.export import export_model
    from medtransfer.predictor import load_predictor
    from medtransfer.scoring import score_folder
    from medtransfer.spec import load_spec
    from medtransfer.synthetic import generate_dicom_dataset
    from medtransfer.training.run import train

    started = time.time()
    out = Path(out_dir)
    log(f"[1/5] generating synthetic DICOM dataset in {out / 'data'}")
    manifest = generate_dicom_dataset(
        out / "data", n_patients=n_patients or DEFAULTS["n_patients"], seed=seed
    )
    spec_path = write_spec(
        manifest,
        backbone=backbone or DEFAULTS["backbone"],
        epochs=epochs or DEFAULTS["epochs"],
        image_size=image_size or DEFAULTS["image_size"],
        seed=seed,
    )
    spec = load_spec(spec_path)
    log(f"[2/5] training {spec.model.backbone} for {spec.training.epochs} epochs")
    run = train(spec, out / "run", overwrite=True)
    log("[3/5] evaluating on held-out patients")
    evaluation = evaluate(run.path, spec, split="test", out_dir=out / "report")
    log(evaluation.summary())
    log("[4/5] exporting SavedModel")
    export_dir = export_model(run.path, out / "export" / "quickstart" / "1", overwrite=True)
    log("[5/5] scoring the DICOM folder with the exported model")
    scores = out / "scores.csv"
    summary = score_folder(
        manifest.parent / "dicom", load_predictor(export_dir), scores, progress=False
    )
    return QuickstartResult(
        spec=spec_path,
        run_dir=run.path,
        report_dir=evaluation.out_dir,
        export_dir=export_dir,
        scores=scores,
        test_auroc=float(evaluation.auroc),
        scoring=summary,
        seconds=time.time() - started,
    )
