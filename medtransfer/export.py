"""Export a run as a versioned SavedModel for TF Serving, with a model card beside it.

The exported graph holds the whole inference path (resize, channel handling, the backbone's own
normalisation, backbone, head) in TensorFlow ops only, so it loads with TensorFlow alone and
serves exactly what was evaluated. Two signatures: ``serving_default`` takes float images in
[0, 1] of any size; ``predict_png`` takes encoded PNG bytes (TF Serving's REST ``{"b64": ...}``).
A model with tabular features takes them in both signatures as flat [batch] tensors named after
the features (float32 with NaN for a missing number; string with "" for a missing category).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer import atomic
from medtransfer.errors import DegenerateModelWarning, ExportError
from medtransfer.evaluation.thresholds import read_thresholds, thresholds_for_json, write_thresholds
from medtransfer.export_layout import (
    EXPORT_GRAPH,
    EXPORT_INFO,
    EXPORT_LEAN,
    EXPORT_OOD,
    EXPORT_PROFILE,
    MODEL_CARD,
    holds_graph,
)
from medtransfer.models.inputs import resize_images
from medtransfer.models.layers import TemperatureScaling
from medtransfer.models.ood import with_ood_score
from medtransfer.models.saved import load_run_model
from medtransfer.models.tta import may_mirror, tta_model
from medtransfer.predictor import ModelInfo
from medtransfer.rundir import THRESHOLDS_FILE, Run, RunInfo, open_run, thresholds_file_name
from medtransfer.spec import TabularFeature

EXPORT_THRESHOLDS = Path("assets.extra") / THRESHOLDS_FILE
_VERSION = re.compile(r"[0-9]+")  # TF Serving's version folders: an integer, ASCII digits
_LABEL_TOKENS = re.compile(r"[|;,]")  # how a multilabel manifest cell separates its classes
_SPLIT_ORDER = ("train", "val", "test")
_NO_SITE = "(not recorded)"
_MODALITY_NAMES = {
    "xray": "X-ray",
    "mammography": "mammography",
    "ct": "CT",
    "mr": "MR",
    "dermoscopy": "dermoscopy",
    "fundus": "fundus photograph",
    "histopathology": "histopathology",
    "ultrasound": "ultrasound",
}


def _decode_png(size: tuple[int, int], channels: int):
    def decode(data: tf.Tensor) -> tf.Tensor:
        # uint16 decoding is exact for both 8-bit (v * 257) and 16-bit PNGs.
        image = tf.io.decode_png(data, channels=channels, dtype=tf.uint16)
        image = tf.cast(image, tf.float32) / 65535.0
        return resize_images(image, size)

    return decode


def build_archive(
    model: keras.Model, info: ModelInfo, ood_reference: dict | None = None
) -> keras.export.ExportArchive:
    """The export archive with both signatures; kept separate so tests can inspect it. With an
    ``ood_reference`` both also output ``ood_score`` (``medtransfer.models.ood``), computed
    from the same pass as the probabilities."""
    if ood_reference is not None:
        model = with_ood_score(model, ood_reference)
    classes = tf.constant(info.class_names)
    size, channels = tuple(info.image_size), info.channels
    tabular_specs = [
        tf.TensorSpec((None,), tf.float32 if f.type == "numeric" else tf.string, name=f.name)
        for f in info.tabular
    ]

    def predict(images: tf.Tensor, tabular: tuple[tf.Tensor, ...]) -> dict[str, tf.Tensor]:
        inputs = images
        if info.tabular:
            columns = {
                f.name: value[:, None] for f, value in zip(info.tabular, tabular, strict=True)
            }
            inputs = {"image": images, **columns}
        outputs = model(inputs, training=False)
        scored = outputs if isinstance(outputs, dict) else {"probabilities": outputs}
        names = tf.tile(classes[None, :], [tf.shape(scored["probabilities"])[0], 1])
        return {**scored, "class_names": names}

    def serve_image(image: tf.Tensor, *tabular: tf.Tensor) -> dict[str, tf.Tensor]:
        return predict(image, tabular)

    def serve_png(image_bytes: tf.Tensor, *tabular: tf.Tensor) -> dict[str, tf.Tensor]:
        images = tf.map_fn(
            _decode_png(size, channels),
            image_bytes,
            fn_output_signature=tf.TensorSpec((*size, channels), tf.float32),
        )
        return predict(images, tabular)

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serving_default",
        serve_image,
        input_signature=[
            tf.TensorSpec((None, None, None, channels), tf.float32, name="image"),
            *tabular_specs,
        ],
    )
    archive.add_endpoint(
        "predict_png",
        serve_png,
        input_signature=[tf.TensorSpec((None,), tf.string, name="image_bytes"), *tabular_specs],
    )
    return archive


def _card_metrics(metrics: dict | None) -> dict | None:
    """The evaluation figures for the card, without the report's local paths."""
    if metrics is None:
        return None
    return {k: v for k, v in metrics.items() if k != "model"}


def _describe_feature(feature: TabularFeature) -> str:
    if feature.type == "numeric":
        kind = "float32 [batch], NaN = missing"
    else:
        kind = f"string [batch], one of {feature.values}; anything else = missing"
    source = f"; scoring reads DICOM {feature.source_tag}" if feature.source_tag else ""
    return f"{feature.name}: {kind}{source}"


def has_class(labels: pd.Series, name: str, task: str) -> pd.Series:
    """Whether each stored label names class ``name`` (multilabel: one of its tokens)."""
    if task != "multilabel":
        return labels == name
    return labels.map(lambda value: name in {t.strip() for t in _LABEL_TOKENS.split(value)})


def _summary_rows(table: pd.DataFrame, by: str, classes: list[str], task: str) -> list[dict]:
    rows = []
    for value, group in table.groupby(by, sort=False):
        prevalence = {
            name: round(float(has_class(group["label"], name, task).mean()), 4) for name in classes
        }
        rows.append(
            {
                by: str(value),
                "images": len(group),
                "patients": int(group["patient"].nunique()),
                "prevalence": prevalence,
            }
        )
    return rows


def data_summary(manifest: pd.DataFrame, classes: list[str], task: str) -> dict:
    """Images, patients and class prevalence per split and per site, from a run's manifest.

    Only counts and fractions: the paths and (hashed) patient keys stay in the run. Splits come
    in the order train, val, test (then any other); ``all`` is every image of the run.
    """
    table = manifest.astype({"split": str, "site": str, "label": str, "patient": str})
    order = {name: i for i, name in enumerate(_SPLIT_ORDER)}
    table = table.sort_values("split", key=lambda s: s.map(lambda v: order.get(v, len(order))))
    table = table.assign(site=table["site"].replace("", _NO_SITE))
    everything = table.assign(split="all")
    return {
        "by_split": _summary_rows(pd.concat([table, everything]), "split", classes, task),
        "by_site": _summary_rows(table.sort_values("site"), "site", classes, task),
    }


def _run_data_summary(run: Run) -> dict | None:
    """The run's data summary, or None for a run without a stored manifest (or an older one)."""
    try:
        return data_summary(run.manifest(), run.info.classes, run.info.task)
    except (FileNotFoundError, KeyError):
        return None


def intended_use(info: ModelInfo, modality: str) -> str:
    """What the model is for, in the run's own terms: task, classes, modality, image size."""
    names = info.class_names
    if info.task == "binary":
        negative = [c for c in names if c != info.positive_class]
        what = f"telling {info.positive_class} (the positive class) from {', '.join(negative)}"
    elif info.task == "multilabel":
        what = f"flagging each of {', '.join(names)} (several may apply to one image)"
    else:
        what = f"assigning one of {len(names)} classes ({', '.join(names)}) to each image"
    kind = _MODALITY_NAMES.get(modality, "medical")
    height, width = info.image_size
    return (
        f"Research and clinical-evaluation use: {what} on {kind} images like the training "
        f"data described below. Every image is resized to {height}x{width} pixels inside the "
        "model, so findings smaller than a pixel at that size cannot be seen. Not a medical "
        "device; a clinician reviews every output."
    )


def _limitations(run_info: RunInfo, data: dict | None) -> list[str]:
    sites = [row["site"] for row in (data or {}).get("by_site", []) if row["site"] != _NO_SITE]
    measured = (
        f"Trained and validated on data from {len(sites)} site(s) ({', '.join(sites)}); "
        if sites
        else "Validated only on the splits listed here (sites not recorded); "
    )
    return [
        measured + "performance at other sites, scanners or populations is unknown until "
        "measured there.",
        "Outputs are uncalibrated probabilities unless a calibration step is recorded below.",
        "Decision thresholds were chosen on the validation split; a new site's prevalence "
        "changes the positive and negative predictive values even at the same threshold.",
        f"Trained as {run_info.task} classification over exactly these classes: an image "
        "showing anything else still gets probabilities over them.",
    ]


def model_card(
    info: ModelInfo,
    run_info: RunInfo,
    metrics: dict | None,
    thresholds: dict | None = None,
    data: dict | None = None,
) -> tuple[str, dict]:
    """The model card as Markdown and JSON: what the model is for and how it was checked.

    Only aggregate figures appear (counts, prevalences, metrics, thresholds): no image path,
    patient key or DICOM value, so the card can travel with the model. ``data`` is the run's
    :func:`data_summary`. ``thresholds`` is the record as evaluation keeps it (+inf allowed);
    the card holds it as written (null plus a note). A degenerate model
    (``degenerate_model`` in run.json or the metrics) is flagged on top.
    """
    card = {
        "model": info.name,
        "task": info.task,
        "classes": info.class_names,
        "positive_class": info.positive_class,
        "modality": run_info.modality,
        "degenerate_model": degenerate_findings(run_info, metrics) or None,
        "input": {
            "serving_default": f"image: float32 [batch, H, W, {info.channels}] in [0, 1], any H, W",
            "predict_png": "image_bytes: string [batch], PNG-encoded (8 or 16 bit)",
            "resized_inside_to": list(info.image_size),
            "dicom_window": info.window,
            "dicom_frames": info.frames,
            "tabular": [_describe_feature(feature) for feature in info.tabular],
        },
        "outputs": {
            "probabilities": f"float32 [batch, {len(info.class_names)}]",
            "class_names": "string [batch, K]",
        },
        "training": {
            "backbone": run_info.backbone,
            "weights": run_info.weights,
            "seed": run_info.seed,
            "images_per_split": run_info.images,
            "data_fingerprint": run_info.data_fingerprint,
            "best_epoch": run_info.best_epoch,
            "best_val_auroc": run_info.best_val_auroc,
        },
        "data_summary": data,
        "evaluation": _card_metrics(metrics),
        "decision_thresholds": None if thresholds is None else thresholds_for_json(thresholds),
        "versions": run_info.versions,
        "intended_use": intended_use(info, run_info.modality),
        "limitations": _limitations(run_info, data),
    }
    return _card_markdown(card, info, metrics, thresholds), card


def degenerate_findings(run_info: RunInfo, metrics: dict | None) -> list[str]:
    """What training and evaluation recorded about a degenerate model, one line each."""
    found = []
    if record := run_info.degenerate_model:
        found.append(f"at the end of training: {record['message']}")
    if record := (metrics or {}).get("degenerate_model"):
        found.append(f"in the evaluation ({metrics.get('split')} split): {record['message']}")
    return found


def _num(value: float | None, digits: int = 3) -> str:
    """A figure rounded for reading; "n/a" for a missing or non-finite one."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: list | None) -> str:
    if ci is None or None in ci:
        return _num(value)
    return f"{_num(value)} (95% CI {_num(ci[0])}-{_num(ci[1])})"


def _threshold_text(threshold: float) -> str:
    return f"{threshold:.4f}" if np.isfinite(threshold) else "none (no image called positive)"


def _point_name(point: str) -> str:
    """An operating point's plain name: ``sensitivity_0.95`` -> "Sensitivity at least 95% ..."."""
    rule, _, value = point.partition("_")
    if rule == "youden":
        return "Best balance of sensitivity and specificity (Youden's J)"
    if rule in ("sensitivity", "specificity") and value:
        return f"{rule.capitalize()} at least {float(value):.0%} on validation"
    if rule == "fixed" and value:
        return f"Fixed cut-off at probability {value}"
    return point


def _data_table(data: dict | None, classes: list[str]) -> list[str]:
    """Two Markdown tables, per split and per site: images, patients, share of each class."""
    if not data:
        return ["No stored manifest: this run did not record its images per split and site."]
    lines = ["Prevalence is the share of images labelled with each class."]
    for by in ("split", "site"):
        head = [by.capitalize(), "Images", "Patients", *[f"{name} (%)" for name in classes]]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in data[f"by_{by}"]:
            cells = [row[by], str(row["images"]), str(row["patients"])]
            cells += [f"{100 * row['prevalence'][name]:.1f}" for name in classes]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _evaluation_lines(metrics: dict | None) -> list[str]:
    if not metrics:
        return ["Not evaluated yet: run `medtransfer evaluate` on the run and export again."]
    lines = [
        f"On the {metrics.get('split', '?')} split: {metrics.get('n_images')} images, "
        f"{metrics.get('n_patients', 'n/a')} patients. Accuracy "
        f"{_num(metrics.get('accuracy'))}, balanced accuracy "
        f"{_num(metrics.get('balanced_accuracy'))}, macro AUROC "
        f"{_num(metrics.get('auroc', {}).get('macro'))}.",
    ]
    discrimination = metrics.get("discrimination") or {}
    if discrimination:
        lines += ["", "| Class | AUROC (95% CI, DeLong) | AUPRC | Positives | Negatives |"]
        lines.append("|---|---|---|---|---|")
    for name, d in discrimination.items():
        auroc = _with_ci(d.get("auroc"), d.get("auroc_ci_delong"))
        lines.append(
            f"| {name} | {auroc} | {_num(d.get('auprc'))} | {d.get('n_positive')} | "
            f"{d.get('n_negative')} |"
        )
    return lines


def _threshold_lines(thresholds: dict | None, metrics: dict | None) -> list[str]:
    if not thresholds:
        return ["None recorded (the run was not evaluated)."]
    lines = [
        f"Chosen on the {thresholds['chosen_on']} split, applied as {thresholds['rule']}; "
        f"stored in `{EXPORT_THRESHOLDS}`. Sensitivity and specificity are measured on the "
        f"{(metrics or {}).get('split', 'test')} split."
    ]
    measured = (metrics or {}).get("operating_points") or {}
    for name, points in thresholds["thresholds"].items():
        lines += ["", f"{name}:"]
        for point, threshold in points.items():
            m = measured.get(name, {}).get(point)
            plain = (m or {}).get("label") or _point_name(point)  # the report's name if it has one
            line = f"- {plain[:1].upper()}{plain[1:]}: {point} {_threshold_text(threshold)}"
            if m:
                line += (
                    f"; sensitivity {_with_ci(m['sensitivity'], m.get('sensitivity_ci'))}, "
                    f"specificity {_with_ci(m['specificity'], m.get('specificity_ci'))}"
                )
            lines.append(line)
    return lines


def _card_markdown(
    card: dict, info: ModelInfo, metrics: dict | None, thresholds: dict | None
) -> str:
    training = card["training"]
    counts = training["images_per_split"] or {}
    ordered = sorted(counts, key=lambda k: _SPLIT_ORDER.index(k) if k in _SPLIT_ORDER else 9)
    split_counts = ", ".join(f"{k} {counts[k]}" for k in ordered)
    epoch = f" (epoch {training['best_epoch']})" if training["best_epoch"] else ""
    lines = [
        f"# Model card: {info.name}",
        "",
        *[f"> **Warning**, found {found}\n" for found in card["degenerate_model"] or []],
        "## Intended use",
        card["intended_use"],
        "",
        "## Model",
        f"- Task: {info.task}; classes: {', '.join(info.class_names)}"
        + (f"; positive class: {info.positive_class}" if info.positive_class else ""),
        f"- Modality: {card['modality']}",
        f"- Backbone: {training['backbone']} (weights: {training['weights']}), "
        f"seed {training['seed']}",
        f"- Input: {card['input']['serving_default']}; resized inside to "
        f"{info.image_size[0]}x{info.image_size[1]}",
        *[f"- Tabular input {item}" for item in card["input"]["tabular"]],
        f"- Best validation AUROC {_num(training['best_val_auroc'])}{epoch}",
        "",
        "## Data",
        f"Images per split: {split_counts or 'not recorded'}; data fingerprint "
        f"`{training['data_fingerprint']}`.",
        "",
        *_data_table(card["data_summary"], info.class_names),
        "",
        "## Evaluation",
        *_evaluation_lines(metrics),
        "",
        "## Decision thresholds",
        *_threshold_lines(thresholds, metrics),
        "",
        "## Limitations",
        *[f"- {item}" for item in card["limitations"]],
    ]
    lines += ["", "## Versions", *[f"- {k}: {v}" for k, v in (card["versions"] or {}).items()]]
    return "\n".join(lines) + "\n"


def calibrated(model: keras.Model, thresholds: dict | None, task: str) -> tuple:
    """The model with the evaluation's temperature applied, and thresholds that still mean the
    same decisions: for a binary task each threshold is mapped through the same monotone
    transform (exactly the same images are called positive); a multiclass task's one-vs-rest
    thresholds have no such map and are dropped (re-evaluate to choose new ones)."""
    temperature = (thresholds or {}).get("temperature")
    if task == "multilabel" or temperature is None:
        raise ExportError(
            "--calibrated needs a binary or multiclass run evaluated first (the temperature is "
            "fitted on its validation split): run medtransfer evaluate on it"
        )
    scaling = TemperatureScaling(temperature, name="calibrated_probabilities")
    named = model.input if isinstance(model.input, dict) else {"image": model.input}
    inputs = {k: keras.Input(t.shape[1:], dtype=t.dtype, name=k) for k, t in named.items()}
    x = inputs if isinstance(model.input, dict) else inputs["image"]
    wrapped = keras.Model(x, scaling(model(x)), name=f"{model.name}_calibrated")
    mapped = {**thresholds, "calibrated_with_temperature": temperature}
    if task == "binary":
        mapped["thresholds"] = {
            name: {point: _scaled_threshold(t, temperature) for point, t in points.items()}
            for name, points in thresholds["thresholds"].items()
        }
    else:
        mapped["thresholds"] = {}
    return wrapped, mapped


def _scaled_threshold(threshold: float, temperature: float) -> float:
    """A binary positive-class threshold after temperature scaling: sigmoid(logit(t) / T)."""
    if threshold <= 0 or threshold > 1 or not np.isfinite(threshold):
        return float(threshold)  # 0 (all positive) and inf (none) keep their meaning
    if threshold == 1:
        return 1.0
    return float(1 / (1 + np.exp(-np.log(threshold / (1 - threshold)) / temperature)))


def version_dir(out_dir: str | Path) -> Path:
    """The ``NAME/VERSION`` folder to export into, the layout TF Serving loads.

    ``out_dir`` ending in an all-digit folder is that version; any other is ``NAME``, and the
    next version in it is used: 1, or one past the highest numbered folder there. A ``NAME``
    folder holding a SavedModel directly (an export made there before) is refused: TF Serving
    cannot load it, and a version beside it would leave the model it serves in doubt.
    """
    target = Path(out_dir)
    if _VERSION.fullmatch(target.name):
        return target
    if holds_graph(target):
        what = "a SavedModel" if (target / EXPORT_GRAPH).is_file() else "an exported model"
        raise ExportError(
            f"{target} holds {what} directly, which TF Serving cannot load: it needs "
            f"NAME/VERSION/ with VERSION a number. Move that export into a version folder "
            f"(e.g. {target / '1'}) or export to another NAME"
        )
    numbered = [int(p.name) for p in _subfolders(target) if _VERSION.fullmatch(p.name)]
    return target / str(max(numbered, default=0) + 1)


def _subfolders(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def kept_evaluation(run: Run, tta: bool) -> tuple[dict | None, dict | None]:
    """The run's kept test metrics and validation thresholds (+inf restored), if evaluated."""
    return run.kept_metrics("test", tta), read_thresholds(run.kept(thresholds_file_name(tta)))


def export_model(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tta: bool = False,
    calibrate: bool = False,
) -> Path:
    """Write a SavedModel plus model card, atomically, and return the version folder used.

    ``out_dir`` is ``…/NAME/VERSION``, or ``…/NAME`` for its next version (:func:`version_dir`).
    The SavedModel is built in a temporary sibling folder and renamed into place, so TF Serving,
    which watches ``NAME/`` for new versions, never sees a half-written version. A degenerate
    model (as training or evaluation recorded it) is exported with a DegenerateModelWarning
    and a warning atop its model card.
    """
    run = open_run(run_dir)
    target = version_dir(out_dir)
    if atomic.is_occupied(target) and not overwrite:
        raise ExportError(f"{target} exists; versions are immutable (use a new version number)")
    info = ModelInfo.from_run_info(run.info)
    metrics, thresholds = kept_evaluation(run, tta)

    def build(built: Path) -> dict:
        model = load_run_model(run)
        if tta:
            model = tta_model(model, mirror=may_mirror(run.info.modality))
        graph_thresholds = thresholds
        if calibrate:
            model, graph_thresholds = calibrated(model, thresholds, info.task)
        # a TTA or calibrated graph's output is not the one pass the features describe
        reference = None if tta or calibrate else run.ood_reference()
        build_archive(model, info, reference).write_out(str(built), verbose=False)
        if reference is not None:
            atomic.write_json(built / EXPORT_OOD, _validation_reference(reference))
        return write_assets(
            built, run, info, metrics, graph_thresholds, tta=tta, calibrate=calibrate
        )

    return publish_version(target, build)


def publish_version(target: Path, build: Callable[[Path], dict]) -> Path:
    """Build a version folder in a temporary sibling and rename it into place, so TF Serving
    (watching ``NAME/``) never sees half a version; ``build`` fills the folder it is given and
    returns the model card, whose degenerate-model findings are warned about. A build that
    fails leaves no trace: not even the ``NAME/`` folder, if this call made it."""
    missing = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        built = staging / "model"
        card = build(built)
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in missing:  # innermost first; a folder something else filled stays
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for found in card["degenerate_model"] or []:
        warnings.warn(f"export {target}: {found}", DegenerateModelWarning, stacklevel=3)
    return target


def _thresholds_moved(lean: dict | None) -> bool:
    recheck = (lean or {}).get("recheck")
    return isinstance(recheck, dict) and bool(recheck.get("moved"))


def _lean_card(markdown: str, card: dict, lean: dict) -> str:
    """The card of a lean graph: its input and output in place of the SavedModel's signatures,
    and a section on the graph and its validation re-check (the Markdown returned)."""
    height, width = card["input"]["resized_inside_to"]
    resized = f"; resized inside to {height}x{width}"
    markdown = markdown.replace(
        f"- Input: {card['input']['serving_default']}{resized}", f"- Input: {lean['input']}"
    )
    card["input"] = {
        **{k: v for k, v in card["input"].items() if k not in ("serving_default", "predict_png")},
        "image": lean["input"],
    }
    card["outputs"] = {"probabilities": lean["output"]}
    card["lean_export"] = lean
    kind = lean["format"] + ("" if lean["quantize"] == "none" else f", {lean['quantize']}")
    if lean.get("scheme") == "int8_weights":  # the calibrated graphs failed the validation check
        kind += " weights only (activations quantised at run time)"
    elif lean.get("denylisted"):  # full integer failed it: its worst layers stay float32
        kind += (
            f" with {len(lean['denylisted'])} layer(s) kept float32, "
            f"{lean['int8_ops']:.0%} of operations int8"
        )
    lines = [
        "",
        "## Lean export",
        f"`{lean['graph']}` ({kind}, {lean['bytes'] / 1e6:.1f} MB). Input {lean['input']}. "
        f"Output {lean['output']}. Details in `{EXPORT_LEAN}`.",
    ]
    recheck = lean.get("recheck")
    if not isinstance(recheck, dict):
        return markdown + "\n".join([*lines, f"Validation re-check {recheck}."]) + "\n"
    agreement = ", ".join(f"{k} {v:.1%}" for k, v in recheck["decision_agreement"].items())
    lines.append(
        f"On the {recheck['images']} validation images its probabilities differ from the "
        f"Keras model's by at most {recheck['max_abs_difference']:.2g}; same decisions: "
        f"{agreement}."
    )
    if "moved" in recheck:
        lines.append(
            "Re-chosen on its own validation predictions, the thresholds moved: this model "
            "ships its own (the test sensitivity and specificity above were measured for the "
            "Keras model and are left out)."
            if recheck["moved"]
            else "Re-chosen on its own validation predictions, the thresholds did not move."
        )
    return markdown + "\n".join(lines) + "\n"


def _validation_reference(reference: dict[str, np.ndarray]) -> dict[str, list]:
    """The validation images' OOD scores (read as percentiles when scoring) and, where the run
    recorded them, their class probabilities (``medtransfer monitor``'s prevalence reference)."""
    out = {"validation_scores": [round(float(v), 6) for v in reference["validation_scores"]]}
    if "validation_probabilities" in reference:
        probs = np.round(reference["validation_probabilities"].astype(float), 6)
        out["validation_probabilities"] = probs.tolist()
    return out


def write_assets(
    built: Path,
    run: Run,
    info: ModelInfo,
    metrics: dict | None,
    thresholds: dict | None,
    *,
    tta: bool = False,
    calibrate: bool = False,
    lean: dict | None = None,
) -> dict:
    """The files beside the graph: model info, thresholds and the model card (returned).

    ``lean`` is a lean export's record (``medtransfer.lean_export``): the card then describes
    that graph's input and output and the re-check of its thresholds."""
    atomic.write_json(built / EXPORT_INFO, info.to_json())
    if (profile := run.profile()) is not None:  # for scope checks where the export is scored
        atomic.write_json(built / EXPORT_PROFILE, profile)
    if thresholds is not None:
        write_thresholds(built / EXPORT_THRESHOLDS, thresholds)
    if _thresholds_moved(lean):  # the test figures were measured at the Keras model's ones
        metrics = {k: v for k, v in (metrics or {}).items() if k != "operating_points"} or None
    markdown, card = model_card(info, run.info, metrics, thresholds, _run_data_summary(run))
    if lean is not None:
        markdown = _lean_card(markdown, card, lean)
    if tta:
        card["test_time_augmentation"] = "built in: probabilities averaged over the views " + (
            "identity, central 90% zoom, and both mirrored"
            if may_mirror(run.info.modality)
            else "identity and central 90% zoom (not mirrored: radiograph)"
        )
        markdown += f"\n## Test-time augmentation\n{card['test_time_augmentation']}\n"
    if calibrate:
        card["calibration"] = (
            f"temperature scaling inside the graph, T = {thresholds['temperature']:.4f}, "
            "fitted on the validation split; thresholds mapped to the calibrated scale"
        )
        markdown += f"\n## Calibration\n{card['calibration']}\n"
    if (built / EXPORT_OOD).is_file():
        card["outputs"]["ood_score"] = (
            "float32 [batch]: sum over the backbone's stages of the Mahalanobis distance of the "
            "image's spatially averaged features to the training images' (each stage scaled to "
            "average 1 on the validation images); read it as a percentile of "
            "assets.extra/ood_validation.json (validation images); at or above the 99th, the "
            "image is unlike what the model was trained on"
        )
        markdown += f"\n## Out-of-distribution score\n`ood_score`: {card['outputs']['ood_score']}\n"
    atomic.write_text(built / "model_card.md", markdown)
    atomic.write_json(built / MODEL_CARD, card)
    return card
