"""Evaluate a model on one split of a spec and write the report files.

The split comes from the spec's manifest rebuilt with the same seed; when the model is a run
directory, the run's stored manifest is used so the test patients are exactly those the run
held out, even if the data folder has since grown.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from medtransfer import atomic
from medtransfer.data.manifest import build_manifest, targets
from medtransfer.data.pipeline import load_images, with_tabular
from medtransfer.errors import SpecError
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.evaluation.plots import roc_figure
from medtransfer.predictor import load_predictor
from medtransfer.spec import Spec
from medtransfer.training.run import EVALUATION_DIR, MANIFEST_FILE, RUN_FILE


@dataclass(frozen=True)
class Evaluation:
    metrics: dict
    predictions: pd.DataFrame
    out_dir: Path

    @property
    def auroc(self) -> float | None:
        return self.metrics["auroc"]["macro"]

    def summary(self) -> str:
        m = self.metrics
        lines = [f"{m['split']} split: {m['n_images']} images"]
        per_class = m["auroc"]["per_class"]
        shown = [m["positive_class"]] if m["task"] == "binary" else list(per_class)
        for name in shown:
            value = per_class[name]
            lines.append(f"  AUROC {name:<20} {'n/a' if value is None else f'{value:.4f}'}")
        if m["task"] != "binary":
            macro = m["auroc"]["macro"]
            lines.append(f"  AUROC {'(macro)':<20} {'n/a' if macro is None else f'{macro:.4f}'}")
        lines.append(f"  accuracy {m['accuracy']:.4f} ({m['accuracy_definition']})")
        return "\n".join(lines)


def _split_rows(spec: Spec, model_dir: Path, split: str) -> pd.DataFrame:
    manifest = build_manifest(spec)
    stored = model_dir / MANIFEST_FILE
    if (model_dir / RUN_FILE).is_file() and stored.is_file():
        held_out = pd.read_csv(stored, keep_default_na=False)
        wanted = set(held_out.loc[held_out["split"] == split, "path"])
        if wanted:
            return manifest[manifest["path"].isin(wanted)]
    return manifest[manifest["split"] == split]


def evaluate(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str = "test",
    out_dir: str | Path,
    workers: int | None = None,
) -> Evaluation:
    """Predict one split and write metrics.json, predictions.csv and roc.png to ``out_dir``."""
    source = Path(model_dir)
    predictor = load_predictor(source)
    info = predictor.info
    if list(spec.classes) != info.class_names:
        raise SpecError(
            f"{spec.origin}: classes: {spec.classes} differ from the model's {info.class_names}"
        )
    if info.tabular:  # the model's own features, whatever the evaluation spec lists
        spec = spec.model_copy(update={"tabular": list(info.tabular)})
    rows = _split_rows(spec, source, split)
    if rows.empty:
        raise SpecError(f"{spec.origin}: the {split} split has no images")
    images = load_images(
        rows,
        info.image_size,
        info.channels,
        window=info.window,
        frames=info.frames,
        workers=workers,
    )
    probabilities = predictor.predict_batch(with_tabular(images, rows, info.tabular))
    y = targets(rows, spec.classes)
    metrics = compute_metrics(y, probabilities, info.class_names, info.task, info.positive_class)
    metrics = {"split": split, "model": str(source.resolve()), **metrics}
    metrics["n_patients"] = int(rows["patient"].nunique())

    predictions = rows[["path", "patient", "site", "label"]].reset_index(drop=True)
    for k, name in enumerate(info.class_names):
        predictions[f"prob_{name}"] = probabilities[:, k]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2)
    atomic.write_text(out / "metrics.json", text)
    atomic.write_text(out / "predictions.csv", predictions.to_csv(index=False))
    figure = roc_figure(
        y,
        probabilities,
        info.class_names,
        task=info.task,
        positive_class=info.positive_class,
        title=f"{info.name}: ROC on {split} (n={len(y)})",
    )
    png = io.BytesIO()
    figure.savefig(png, format="png")
    atomic.write_bytes(out / "roc.png", png.getvalue())
    if (source / RUN_FILE).is_file():
        atomic.write_text(source / EVALUATION_DIR / f"metrics_{split}.json", text)
    return Evaluation(metrics, predictions, out)
