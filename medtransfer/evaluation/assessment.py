"""Evaluate a model on one split of a spec, in memory: ``assess`` writes nothing.

A notebook may want the metrics without a report folder, and a report folder is only one way
to keep them, so computing and writing are apart, as Keras' ``fit`` returns a History and its
callbacks write: ``report_files.write_report`` puts an ``Assessment`` on disk and
``report.evaluate`` does both.

The split comes from the spec's manifest rebuilt with the same seed; when the model is a run
directory, the run's stored manifest is used so the test patients are exactly those the run
held out, even if the data folder has since grown.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from medtransfer import __version__
from medtransfer.data.decode_pool import DecodePool
from medtransfer.data.manifest import (
    NPZ_SEPARATOR,
    build_manifest,
    fingerprint,
    read_tags,
    targets,
)
from medtransfer.data.pipeline import load_images, with_tabular
from medtransfer.data.tabular import column_name
from medtransfer.errors import SpecError
from medtransfer.evaluation.cam_examples import gradcam_examples
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
    subgroups,
)
from medtransfer.evaluation.metrics import compute_metrics
from medtransfer.evaluation.plots import reliability_figure, roc_figure
from medtransfer.export_layout import MODEL_CARD
from medtransfer.models.degenerate import degenerate_model, warn_degenerate
from medtransfer.predictor import ModelInfo, Predictor, load_predictor
from medtransfer.rundir import is_run, open_run
from medtransfer.spec import Spec, reported_classes


@dataclass(frozen=True)
class ReportFigure:
    """A figure of the report with its caption in report.html."""

    caption: str
    figure: Figure


@dataclass(frozen=True)
class Assessment:
    """What ``assess`` found, nothing written yet.

    ``metrics`` is metrics.json, ``predictions`` predictions.csv, ``thresholds`` the record of
    thresholds.json (in memory a threshold may be +inf), ``figures`` the report's figures by
    name (``roc``, ``reliability`` and ``gradcam`` when there is one), ``title`` the report's.
    ``model_dir`` is the model assessed: when it is a run, the writer keeps metrics and
    thresholds in it."""

    model_dir: Path
    metrics: dict
    predictions: pd.DataFrame
    thresholds: dict
    figures: dict[str, ReportFigure]
    title: str


def assess(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str = "test",
    workers: int | None = None,
    settings: ClinicalSettings | None = None,
    tta: bool = False,
) -> Assessment:
    """Predict one split and compute everything the report shows, writing nothing.

    The validation split is predicted too: operating points and the calibration temperature
    are chosen there and applied unchanged to ``split``. ``tta`` assesses the model averaged
    over test-time views (``medtransfer.models.tta``); its thresholds are then the TTA
    model's. A model whose predictions do not vary across the images of either split is
    flagged (``degenerate_model`` in the metrics) with a DegenerateModelWarning.
    """
    assessment = compute_assessment(
        model_dir, spec, split=split, workers=workers, settings=settings, tta=tta
    )
    warn_degenerate(assessment.metrics["degenerate_model"], f"evaluate {assessment.model_dir}")
    return assessment


def compute_assessment(
    model_dir: str | Path,
    spec: Spec,
    *,
    split: str,
    workers: int | None,
    settings: ClinicalSettings | None,
    tta: bool,
) -> Assessment:
    """``assess`` without its warning, for a caller that warns itself: a warning points at the
    caller of whoever issues it, which should be the user's code whichever entry they took."""
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
    rows = split_rows(spec, source, split)
    if rows.empty:
        raise SpecError(f"{spec.origin}: the {split} split has no images")
    with DecodePool(workers) as pool:  # one pool's start-up for the split and val
        probabilities = _predict(predictor, rows, pool)
        val_rows = rows if split == "val" else split_rows(spec, source, "val")
        if split == "val":
            p_val = probabilities
        elif val_rows.empty:  # nothing to choose thresholds on
            p_val = None
        else:
            p_val = _predict(predictor, val_rows, pool)
    return assessment_from_probabilities(
        source,
        info,
        rows,
        probabilities,
        val_rows,
        p_val,
        split=split,
        settings=settings,
        tta=tta,
        predictor=predictor,
    )


def assessment_from_probabilities(
    source: Path,
    info: ModelInfo,
    rows: pd.DataFrame,
    probabilities: np.ndarray,
    val_rows: pd.DataFrame,
    val_probabilities: np.ndarray | None,
    *,
    split: str,
    settings: ClinicalSettings,
    tta: bool = False,
    predictor: Predictor | None = None,
) -> Assessment:
    """Everything the report shows, from the probabilities of ``split``'s ``rows`` and of the
    validation rows (where operating points and the temperature are chosen).

    ``evaluate`` gets them from a model; a linear probe (``medtransfer.evaluation.probe``) from
    a classifier on frozen features, so both are judged by the same code. Grad-CAM examples
    need a ``predictor`` (a network to explain) and are left out without one; ``source`` is
    the model folder the provenance names.
    """
    y = targets(rows, info.class_names)
    val = _validate(info, val_rows, val_probabilities, settings)
    metrics = _metrics(source, split, rows, y, probabilities, val, info, settings, tta)
    metrics["provenance"] = provenance(source, info, split, rows)
    metrics["threshold_selection"] = _selection(val, info)
    threshold_record = {
        "chosen_on": "val",
        "rule": "probability >= threshold",
        "thresholds": val.thresholds,
        "temperature": val.temperature,
        "settings": settings.to_json(),
    }
    title = f"{info.name}: {split} split (n={len(y)})"
    return Assessment(
        model_dir=source,
        metrics=metrics,
        predictions=_predictions_table(rows, y, probabilities, info.class_names),
        thresholds=threshold_record,
        figures=_figures(info, predictor, rows, y, probabilities, val, metrics, settings, title),
        title=title,
    )


def split_rows(spec: Spec, model_dir: Path, split: str) -> pd.DataFrame:
    manifest = build_manifest(spec)
    if is_run(model_dir):
        held_out = open_run(model_dir).manifest()
        wanted = set(held_out.loc[held_out["split"] == split, "path"])
        if wanted:
            return manifest[manifest["path"].isin(wanted)]
    return manifest[manifest["split"] == split]


def _predict(predictor: Predictor, rows: pd.DataFrame, pool: DecodePool) -> np.ndarray:
    info = predictor.info
    images = load_images(
        rows,
        info.image_size,
        info.channels,
        window=info.window,
        frames=info.frames,
        workers=pool,
    )
    return predictor.predict_batch(with_tabular(images, rows, info.tabular))


@dataclass(frozen=True)
class _Validation:
    """The validation split's predictions and what is chosen on them for the split evaluated."""

    rows: pd.DataFrame
    y: np.ndarray
    probabilities: np.ndarray | None
    thresholds: dict[str, dict[str, float]]
    temperature: float | None


def _validate(
    info: ModelInfo,
    val_rows: pd.DataFrame,
    p_val: np.ndarray | None,
    settings: ClinicalSettings,
) -> _Validation:
    """Operating points and the calibration temperature, chosen on the validation split (the
    split being evaluated when that is val; none when the validation split is empty)."""
    classes, task, positive = info.class_names, info.task, info.positive_class
    if val_rows.empty:
        return _Validation(val_rows, np.zeros((0, len(classes))), None, {}, None)
    y_val = targets(val_rows, classes)
    return _Validation(
        val_rows,
        y_val,
        p_val,
        choose_operating_points(y_val, p_val, classes, task, positive, settings),
        fit_calibration_temperature(y_val, p_val, task),
    )


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
    info: ModelInfo,
    predictor: Predictor | None,
    rows: pd.DataFrame,
    y: np.ndarray,
    probabilities: np.ndarray,
    val: _Validation,
    metrics: dict,
    settings: ClinicalSettings,
    title: str,
) -> dict[str, ReportFigure]:
    """The report's figures: ROC, reliability (binary and multiclass), Grad-CAM (with a
    ``predictor``)."""
    classes, task, positive = info.class_names, info.task, info.positive_class
    roc_title = f"{info.name}: ROC on {metrics['split']} (n={len(y)})"
    marked = {
        name: {
            m["label"]: (1 - m["specificity"], m["sensitivity"])
            for m in points.values()
            if m["sensitivity"] is not None and m["specificity"] is not None
        }
        for name, points in metrics["operating_points"].items()
    }
    roc = roc_figure(
        y, probabilities, classes, task=task, positive_class=positive, title=roc_title,
        points=marked,
    )  # fmt: skip
    caption = "ROC, with the operating points (thresholds from val) marked" if marked else "ROC"
    figures = {"roc": ReportFigure(caption, roc)}
    if "uncalibrated" in metrics["calibration"]:
        figure = reliability_figure(metrics["calibration"], title=title)
        figures["reliability"] = ReportFigure("Reliability", figure)
    if settings.gradcam_examples and predictor is not None:
        headline = metrics["subgroups_class"]
        cut = val.thresholds.get(headline, {}).get("youden", 0.5)
        without = val.rows.iloc[np.flatnonzero(val.y[:, classes.index(headline)] == 0)]
        cams = gradcam_examples(
            predictor, rows, probabilities, y, headline, cut, settings.gradcam_examples, without
        )
        if cams is not None:
            figure, caption = cams
            figures["gradcam"] = ReportFigure(caption, figure)
    return figures


def provenance(source: Path, info: ModelInfo, split: str, rows: pd.DataFrame) -> dict:
    """What the report says about where its figures come from: the model (a run folder's name,
    or an export's model and version folder names, never a full path, which may hold a
    person's name), its training record, when and with which medtransfer it was evaluated, and
    the evaluated images' fingerprint (``data.manifest.fingerprint`` of the split's rows)."""
    folder = source.resolve()
    if is_run(source):
        run_info = open_run(source).info
        model = {"kind": "run directory", "folder": folder.name}
        training = {
            "backbone": run_info.backbone,
            "weights": run_info.weights,
            "seed": run_info.seed,
            "best_epoch": run_info.best_epoch,
            "best_val_auroc": run_info.best_val_auroc,
            "data_fingerprint": run_info.data_fingerprint,
        }
    else:
        model = {"kind": "export", "folder": f"{folder.parent.name}/{folder.name}"}
        training = _export_training(source)
    return {
        "model": {**model, "name": info.name, **training},
        "evaluated_at": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "medtransfer_version": __version__,
        "split": split,
        "n_images": len(rows),
        "data_fingerprint": fingerprint(rows),
    }


def _export_training(source: Path) -> dict:
    """The training record an export's model card keeps (empty when there is no card)."""
    card = source / MODEL_CARD
    try:
        training = json.loads(card.read_text()).get("training") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    keys = ("backbone", "weights", "seed", "best_epoch", "best_val_auroc", "data_fingerprint")
    return {key: training.get(key) for key in keys}


def _selection(val: _Validation, info: ModelInfo) -> dict:
    """The validation split the thresholds and temperature were chosen on: its size and, per
    reported class, its positives, negatives and prevalence."""
    classes = {}
    for name in reported_classes(info.class_names, info.task, info.positive_class):
        y = val.y[:, info.class_names.index(name)]
        y = y[~np.isnan(y)]
        n_pos = int(y.sum())
        classes[name] = {
            "n_positive": n_pos,
            "n_negative": len(y) - n_pos,
            "prevalence": n_pos / len(y) if len(y) else None,
        }
    return {"split": "val", "n_images": len(val.rows), "classes": classes}
