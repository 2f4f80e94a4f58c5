"""Evaluate a model on one split of a spec and write the report files.

The split comes from the spec's manifest rebuilt with the same seed; when the model is a run
directory, the run's stored manifest is used so the test patients are exactly those the run
held out, even if the data folder has since grown.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer import atomic
from medtransfer.data.manifest import NPZ_SEPARATOR, build_manifest, read_tags, targets
from medtransfer.data.pipeline import load_images, with_tabular
from medtransfer.data.tabular import column_name
from medtransfer.errors import RunError, SpecError
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
    threshold_note,
)
from medtransfer.evaluation.degenerate import degenerate_model, warn_degenerate
from medtransfer.evaluation.html_report import render_report
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.evaluation.plots import reliability_figure, roc_figure
from medtransfer.predictor import ModelInfo, Predictor, load_predictor
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


@dataclass(frozen=True)
class _Validation:
    """The validation split's predictions and what is chosen on them for the split evaluated."""

    rows: pd.DataFrame
    y: np.ndarray
    probabilities: np.ndarray | None
    thresholds: dict[str, dict[str, float]]
    temperature: float | None


def _validate(
    predictor: Predictor,
    spec: Spec,
    source: Path,
    split: str,
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    settings: ClinicalSettings,
    workers: int | None,
) -> _Validation:
    """Operating points and the calibration temperature, chosen on the validation split (the
    split being evaluated when that is val; none when the validation split is empty)."""
    info = predictor.info
    val_rows = rows if split == "val" else _split_rows(spec, source, "val")
    if val_rows.empty:
        return _Validation(val_rows, np.zeros((0, len(spec.classes))), None, {}, None)
    p_val = probabilities if split == "val" else _predict(predictor, val_rows, workers)
    y_val = targets(val_rows, spec.classes)
    classes, task, positive = info.class_names, info.task, info.positive_class
    return _Validation(
        val_rows,
        y_val,
        p_val,
        choose_operating_points(y_val, p_val, classes, task, positive, settings),
        fit_calibration_temperature(y_val, p_val, task),
    )


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
    A model whose predictions do not vary across the images of either split is flagged
    (``degenerate_model`` in metrics.json, a box atop report.html, a DegenerateModelWarning).
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
    val = _validate(predictor, spec, source, split, rows, probabilities, settings, workers)
    metrics = _metrics(source, split, rows, y, probabilities, val, info, settings, tta)
    warn_degenerate(metrics["degenerate_model"], f"evaluate {source}")
    threshold_record = {
        "chosen_on": "val",
        "rule": "probability >= threshold",
        "thresholds": val.thresholds,
        "temperature": val.temperature,
        "settings": settings.to_json(),
    }
    predictions = _predictions_table(rows, y, probabilities, info.class_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "metrics.json", metrics)
    atomic.write_text(out / "predictions.csv", predictions.to_csv(index=False))
    write_thresholds(out / THRESHOLDS_FILE, threshold_record)
    title = f"{info.name}: {split} split (n={len(y)})"
    figures = _figures(predictor, rows, y, probabilities, val, metrics, settings, title)
    files = {"ROC": "roc.png", "Reliability": "reliability.png"}
    for caption, png in figures.items():  # the third, if any, is the Grad-CAM overlay
        atomic.write_bytes(out / files.get(caption, "gradcam.png"), png)
    atomic.write_text(out / "report.html", render_report(metrics, figures, title))
    if (source / RUN_FILE).is_file():
        kept = source / EVALUATION_DIR
        atomic.write_json(kept / f"metrics_{split}{'_tta' if tta else ''}.json", metrics)
        write_thresholds(kept / thresholds_file_name(tta), threshold_record)
    return Evaluation(metrics, predictions, out)


def _predictions_table(
    rows: pd.DataFrame, y: np.ndarray, probabilities: np.ndarray, classes: list[str]
) -> pd.DataFrame:
    """predictions.csv: per image its labels (1, 0, or empty where unknown) and probabilities."""
    predictions = rows[["path", "patient", "site", "label"]].reset_index(drop=True)
    for k, name in enumerate(classes):
        predictions[f"y_{name}"] = y[:, k]
    for k, name in enumerate(classes):
        predictions[f"prob_{name}"] = probabilities[:, k]
    return predictions


def _metrics(
    source: Path,
    split: str,
    rows: pd.DataFrame,
    y: np.ndarray,
    probabilities: np.ndarray,
    val: _Validation,
    info: ModelInfo,
    settings: ClinicalSettings,
    tta: bool,
) -> dict:
    """Everything metrics.json holds for ``split``, with points and calibration from ``val``."""
    classes, task, positive = info.class_names, info.task, info.positive_class
    predicted = {split: probabilities}
    if val.probabilities is not None:
        predicted["val"] = val.probabilities
    metrics = {
        "split": split,
        "model": str(source.resolve()),
        "degenerate_model": degenerate_model(predicted, classes, task, positive),
        **compute_metrics(y, probabilities, classes, task, positive),
    }
    metrics["n_patients"] = int(rows["patient"].nunique())
    metrics["tta"] = tta
    metrics["balanced_accuracy"] = balanced_accuracy(y, probabilities, task)
    metrics["clinical_settings"] = settings.to_json()
    metrics["discrimination"] = discrimination(
        y, probabilities, classes, task, positive, settings, rows["patient"].to_numpy()
    )
    metrics["operating_points"] = operating_points(
        y, probabilities, classes, val.thresholds, settings
    )
    positive_index = classes.index(positive or classes[-1])
    metrics["calibration"] = calibration(
        y, probabilities, task, positive_index, settings, val.temperature
    )
    headline = reported_classes(classes, task, positive)[0]
    metrics["subgroups_class"] = headline
    metrics["subgroups"] = subgroups(
        _subgroup_columns(rows, info.tabular), y, probabilities, classes.index(headline), settings
    )
    return metrics


def _figures(
    predictor: Predictor,
    rows: pd.DataFrame,
    y: np.ndarray,
    probabilities: np.ndarray,
    val: _Validation,
    metrics: dict,
    settings: ClinicalSettings,
    title: str,
) -> dict[str, bytes]:
    """The report's PNGs by caption: ROC, reliability (binary and multiclass), Grad-CAM."""
    info = predictor.info
    classes, task, positive = info.class_names, info.task, info.positive_class
    roc_title = f"{info.name}: ROC on {metrics['split']} (n={len(y)})"
    roc = roc_figure(y, probabilities, classes, task=task, positive_class=positive, title=roc_title)
    figures = {"ROC": _png(roc)}
    if "uncalibrated" in metrics["calibration"]:
        figures["Reliability"] = _png(reliability_figure(metrics["calibration"], title=title))
    if settings.gradcam_examples:
        headline = metrics["subgroups_class"]
        cut = val.thresholds.get(headline, {}).get("youden", 0.5)
        without = val.rows.iloc[np.flatnonzero(val.y[:, classes.index(headline)] == 0)]
        cams = _gradcam_figure(
            predictor, rows, probabilities, y, headline, cut, settings.gradcam_examples, without
        )
        if cams is not None:
            figure, caption = cams
            figures[caption] = _png(figure)
    return figures


def thresholds_for_json(record: dict) -> dict:
    """The thresholds record as written: JSON has no infinity, so a +inf threshold is written
    as null, with a note in ``threshold_notes[class][point]`` saying what it stands for."""
    notes = {}
    for name, points in record["thresholds"].items():
        noted = {p: note for p, t in points.items() if (note := threshold_note(p, t))}
        if noted:
            notes[name] = noted
    return {**record, "threshold_notes": notes}


def write_thresholds(path: str | Path, record: dict) -> None:
    """Write a thresholds record (in-memory thresholds may be +inf) as strict JSON."""
    atomic.write_json(path, thresholds_for_json(record))


def read_thresholds(path: str | Path) -> dict | None:
    """A thresholds file (None if there is none) with each null threshold back to +inf, the
    decision it stands for (no image called positive); older files' ``Infinity`` reads too."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
        record.pop("threshold_notes", None)  # derived from the thresholds: rewritten with them
        record["thresholds"] = {
            name: {point: atomic.float_or(t, math.inf) for point, t in points.items()}
            for name, points in record["thresholds"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # truncated or edited
        raise RunError(
            f"{file} is not a thresholds file ({type(exc).__name__}): evaluate the run again"
        ) from None
    return record
