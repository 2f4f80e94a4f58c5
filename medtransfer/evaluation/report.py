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

import numpy as np
import pandas as pd

from medtransfer import atomic
from medtransfer.data.manifest import NPZ_SEPARATOR, build_manifest, read_tags, targets
from medtransfer.data.pipeline import load_images, with_tabular
from medtransfer.data.tabular import column_name
from medtransfer.errors import SpecError
from medtransfer.evaluation.clinical import (
    SUBGROUP_TAGS,
    ClinicalSettings,
    age_band,
    balanced_accuracy,
    calibration,
    choose_operating_points,
    discrimination,
    fit_calibration_temperature,
    operating_points,
    reported_classes,
    subgroups,
)
from medtransfer.evaluation.html_report import render_report
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.evaluation.plots import reliability_figure, roc_figure
from medtransfer.predictor import load_predictor
from medtransfer.spec import Spec
from medtransfer.training.run import EVALUATION_DIR, MANIFEST_FILE, RUN_FILE

THRESHOLDS_FILE = "thresholds.json"


def thresholds_file_name(tta: bool) -> str:
    """Where a run keeps the thresholds of its plain or its test-time-augmented model."""
    return "thresholds_tta.json" if tta else THRESHOLDS_FILE


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
        level = round(100 * m["clinical_settings"]["level"])
        for name in shown:
            value = per_class[name]
            d = m["discrimination"].get(name, {})
            ci = d.get("auroc_ci_delong")
            interval = f"  ({level}% CI {ci[0]:.4f}-{ci[1]:.4f}, DeLong)" if ci else ""
            lines.append(
                f"  AUROC {name:<20} {'n/a' if value is None else f'{value:.4f}'}{interval}"
            )
        if m["task"] != "binary":
            macro = m["auroc"]["macro"]
            lines.append(f"  AUROC {'(macro)':<20} {'n/a' if macro is None else f'{macro:.4f}'}")
        lines.append(f"  accuracy {m['accuracy']:.4f} ({m['accuracy_definition']})")
        for name, points in m["operating_points"].items():
            youden = points.get("youden")
            if youden and youden["sensitivity"] is not None and youden["specificity"] is not None:
                lines.append(
                    f"  {name} at the Youden threshold from val ({youden['threshold']:.4f}): "
                    f"sensitivity {youden['sensitivity']:.3f}, "
                    f"specificity {youden['specificity']:.3f}"
                )
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


def _predict(predictor, rows: pd.DataFrame, workers: int | None) -> np.ndarray:
    info = predictor.info
    images = load_images(
        rows,
        info.image_size,
        info.channels,
        window=info.window,
        frames=info.frames,
        workers=workers,
    )
    return predictor.predict_batch(with_tabular(images, rows, info.tabular))


def _subgroup_columns(rows: pd.DataFrame, tabular) -> dict[str, list[str]]:
    """What the images can be grouped by: site, categorical features, age bands and the
    non-identifying DICOM tags in ``SUBGROUP_TAGS``; missing values form their own group."""
    columns = {"site": rows["site"].astype(str).replace("", "missing").tolist()}
    for feature in tabular:
        values = rows[column_name(feature.name)]
        if feature.type == "categorical":
            columns[feature.name] = values.replace("", "missing").tolist()
        elif feature.name == "age":
            columns["age"] = [age_band(v) for v in values.astype(float)]
    files = [p for p in rows["path"] if NPZ_SEPARATOR not in p]
    if len(files) == len(rows):
        tags = read_tags(files, list(SUBGROUP_TAGS))
        for tag in SUBGROUP_TAGS:
            columns[tag] = tags[f"_{tag}"].replace("", "missing").tolist()
    return columns


def explained_examples(
    probabilities: np.ndarray, y: np.ndarray, k: int, threshold: float, n: int
) -> list[tuple[str, int]]:
    """(kind, row) of the most confident true positives and false positives and the clearest
    false negatives for class ``k`` at ``threshold``: the cases a reader wants to see."""
    p, positive = probabilities[:, k], y[:, k] == 1
    called = p >= threshold
    picks = []
    for kind, mask, descending in (
        ("TP", positive & called, True),
        ("FP", ~positive & called & ~np.isnan(y[:, k]), True),
        ("FN", positive & ~called, False),
    ):
        index = np.flatnonzero(mask)
        order = index[np.argsort(-p[index] if descending else p[index], kind="stable")]
        picks += [(kind, int(i)) for i in order[:n]]
    return picks


MAX_REFERENCE_IMAGES = 64


def _gradcam_figure(predictor, rows, probabilities, y, class_name, threshold, n, reference_rows):
    """Grad-CAM overlays of the examples above and a caption, or None for a model without one
    backbone (ensembles, TTA models) or an export (no layers left to explain).

    Heatmaps are measured from the mean features of ``reference_rows`` (validation images
    without the class, up to 64 spread over the split): plain Grad-CAM of a network trained
    from scratch points at what every image shares (benchmarks/RESULTS.md)."""
    from medtransfer.evaluation.gradcam import cam_overlay_figure, grad_cam, localising_layer

    model = getattr(predictor, "model", None)
    if model is None or "backbone" not in [layer.name for layer in model.layers]:
        return None
    info, k = predictor.info, predictor.info.class_names.index(class_name)
    picks = explained_examples(probabilities, y, k, threshold, n)
    if not picks:
        return None

    def inputs(chosen):
        images = load_images(chosen, info.image_size, info.channels, window=info.window,
                             frames=info.frames, workers=0)  # fmt: skip
        return images, with_tabular(images, chosen, info.tabular)

    images, explained = inputs(rows.iloc[[i for _, i in picks]])
    reference, baseline = None, "plain (no validation images without it)"
    if len(reference_rows):
        spread = np.linspace(0, len(reference_rows) - 1, MAX_REFERENCE_IMAGES).astype(int)
        normal = reference_rows.iloc[np.unique(spread)]
        reference = inputs(normal)[1]
        baseline = f"measured from the mean of {len(normal)} validation images without it"
    layer = localising_layer(model)
    heatmaps = grad_cam(model, explained, k, layer=layer, reference=reference)
    titles = [f"{kind} P={probabilities[i, k]:.2f}" for kind, i in picks]
    caption = (
        f"Grad-CAM ({class_name}) at {layer}, {baseline}: most confident TP, FP and clearest FN"
    )
    return cam_overlay_figure(images, heatmaps, titles, columns=min(len(picks), 2 * n)), caption


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def evaluate(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str = "test",
    out_dir: str | Path,
    workers: int | None = None,
    settings: ClinicalSettings | None = None,
    tta: bool = False,
) -> Evaluation:
    """Predict one split and write the report: metrics.json, predictions.csv, thresholds.json,
    roc.png, reliability.png and a self-contained report.html, in ``out_dir``.

    The validation split is predicted too: operating points and the calibration temperature
    are chosen there and applied unchanged to ``split``. For a run directory the thresholds
    are also kept in the run (``evaluation/thresholds.json``), where ``export`` picks them up.
    ``tta`` evaluates the model averaged over test-time views (``medtransfer.models.tta``);
    its thresholds are then the TTA model's, for an export made with ``--tta``.
    """
    settings = settings or ClinicalSettings()
    source = Path(model_dir)
    predictor = load_predictor(source, tta=tta)
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
    probabilities = _predict(predictor, rows, workers)
    y = targets(rows, spec.classes)
    classes, task, positive = info.class_names, info.task, info.positive_class
    metrics = compute_metrics(y, probabilities, classes, task, positive)
    metrics = {"split": split, "model": str(source.resolve()), **metrics}
    metrics["n_patients"] = int(rows["patient"].nunique())
    metrics["tta"] = tta
    metrics["balanced_accuracy"] = balanced_accuracy(y, probabilities, task)
    metrics["clinical_settings"] = settings.to_json()
    metrics["discrimination"] = discrimination(
        y, probabilities, classes, task, positive, settings, rows["patient"].to_numpy()
    )

    val_rows = rows if split == "val" else _split_rows(spec, source, "val")
    thresholds, temperature, y_val = {}, None, np.zeros((0, len(spec.classes)))
    if not val_rows.empty:
        p_val = probabilities if split == "val" else _predict(predictor, val_rows, workers)
        y_val = targets(val_rows, spec.classes)
        thresholds = choose_operating_points(y_val, p_val, classes, task, positive, settings)
        temperature = fit_calibration_temperature(y_val, p_val, task)
    metrics["operating_points"] = operating_points(y, probabilities, classes, thresholds, settings)
    positive_index = classes.index(positive or classes[-1])
    metrics["calibration"] = calibration(
        y, probabilities, task, positive_index, settings, temperature
    )
    headline = reported_classes(classes, task, positive)[0]
    metrics["subgroups_class"] = headline
    metrics["subgroups"] = subgroups(
        _subgroup_columns(rows, info.tabular), y, probabilities, classes.index(headline), settings
    )
    threshold_record = {
        "chosen_on": "val",
        "rule": "probability >= threshold",
        "thresholds": thresholds,
        "temperature": temperature,
        "settings": settings.to_json(),
    }

    predictions = rows[["path", "patient", "site", "label"]].reset_index(drop=True)
    for k, name in enumerate(classes):
        predictions[f"y_{name}"] = y[:, k]  # 1, 0, or empty where a label is unknown
    for k, name in enumerate(classes):
        predictions[f"prob_{name}"] = probabilities[:, k]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(metrics, indent=2)
    atomic.write_text(out / "metrics.json", text)
    atomic.write_text(out / "predictions.csv", predictions.to_csv(index=False))
    atomic.write_text(out / THRESHOLDS_FILE, json.dumps(threshold_record, indent=2))
    title = f"{info.name}: {split} split (n={len(y)})"
    figures = {
        "ROC": _png(roc_figure(y, probabilities, classes, task=task, positive_class=positive,
                               title=f"{info.name}: ROC on {split} (n={len(y)})")),
    }  # fmt: skip
    if "uncalibrated" in metrics["calibration"]:
        figures["Reliability"] = _png(reliability_figure(metrics["calibration"], title=title))
    if settings.gradcam_examples:
        cut = thresholds.get(headline, {}).get("youden", 0.5)
        without = val_rows.iloc[np.flatnonzero(y_val[:, classes.index(headline)] == 0)]
        cams = _gradcam_figure(
            predictor, rows, probabilities, y, headline, cut, settings.gradcam_examples, without
        )
        if cams is not None:
            figure, caption = cams
            figures[caption] = _png(figure)
            atomic.write_bytes(out / "gradcam.png", figures[caption])
    atomic.write_bytes(out / "roc.png", figures["ROC"])
    if "Reliability" in figures:
        atomic.write_bytes(out / "reliability.png", figures["Reliability"])
    atomic.write_text(out / "report.html", render_report(metrics, figures, title))
    if (source / RUN_FILE).is_file():
        kept = source / EVALUATION_DIR
        atomic.write_text(kept / f"metrics_{split}{'_tta' if tta else ''}.json", text)
        atomic.write_text(kept / thresholds_file_name(tta), json.dumps(threshold_record, indent=2))
    return Evaluation(metrics, predictions, out)
