"""Export a run as a versioned SavedModel for TF Serving, with a model card beside it.

The exported graph holds the whole inference path (resize, channel handling, the backbone's own
normalisation, backbone, head) in TensorFlow ops only, so it loads with TensorFlow alone and
serves exactly what was evaluated. Two signatures: ``serving_default`` takes float images in
[0, 1] of any size; ``predict_png`` takes encoded PNG bytes (TF Serving's REST ``{"b64": ...}``).
A model with tabular features takes them in both signatures as flat [batch] tensors named after
the features (float32 with NaN for a missing number; string with "" for a missing category).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from medtransfer import atomic
from medtransfer.errors import DegenerateModelWarning, ExportError
from medtransfer.evaluation.thresholds import read_thresholds, thresholds_for_json, write_thresholds
from medtransfer.models.inputs import resize_images
from medtransfer.models.layers import TemperatureScaling
from medtransfer.models.saved import load_run_model
from medtransfer.models.tta import may_mirror, tta_model
from medtransfer.predictor import EXPORT_INFO, ModelInfo
from medtransfer.rundir import THRESHOLDS_FILE, Run, RunInfo, open_run, thresholds_file_name
from medtransfer.spec import TabularFeature

EXPORT_THRESHOLDS = Path("assets.extra") / THRESHOLDS_FILE
_VERSION = re.compile(r"[0-9]+")  # TF Serving's version folders: an integer, ASCII digits


def _decode_png(size: tuple[int, int], channels: int):
    def decode(data: tf.Tensor) -> tf.Tensor:
        # uint16 decoding is exact for both 8-bit (v * 257) and 16-bit PNGs.
        image = tf.io.decode_png(data, channels=channels, dtype=tf.uint16)
        image = tf.cast(image, tf.float32) / 65535.0
        return resize_images(image, size)

    return decode


def build_archive(model: keras.Model, info: ModelInfo) -> keras.export.ExportArchive:
    """The export archive with both signatures; kept separate so tests can inspect it."""
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
        probabilities = model(inputs, training=False)
        names = tf.tile(classes[None, :], [tf.shape(probabilities)[0], 1])
        return {"probabilities": probabilities, "class_names": names}

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


def model_card(
    info: ModelInfo, run_info: RunInfo, metrics: dict | None, thresholds: dict | None = None
) -> tuple[str, dict]:
    """The model card as Markdown and JSON: what the model is for and how it was checked.

    Only aggregate figures appear (counts, metrics, thresholds): no image path, patient key or
    DICOM value, so the card can travel with the model. ``thresholds`` is the record as
    evaluation keeps it (+inf allowed); the card holds it as written (null plus a note).
    A degenerate model (``degenerate_model`` in run.json or the metrics) is flagged on top.
    """
    card = {
        "model": info.name,
        "task": info.task,
        "classes": info.class_names,
        "positive_class": info.positive_class,
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
        "evaluation": _card_metrics(metrics),
        "decision_thresholds": None if thresholds is None else thresholds_for_json(thresholds),
        "versions": run_info.versions,
        "intended_use": "Research and clinical-evaluation use on images like the training data. "
        "Not a medical device; a clinician reviews every output.",
        "limitations": [
            "Validated only on the splits listed here; performance at other sites, scanners or "
            "populations is unknown until measured there.",
            "Outputs are uncalibrated probabilities unless a calibration step is recorded above.",
        ],
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


def _threshold_text(threshold: float) -> str:
    return f"{threshold:.4f}" if np.isfinite(threshold) else "none (no image called positive)"


def _card_markdown(
    card: dict, info: ModelInfo, metrics: dict | None, thresholds: dict | None
) -> str:
    training = card["training"]
    lines = [
        f"# Model card: {info.name}",
        "",
        *[f"> **Warning**, found {found}\n" for found in card["degenerate_model"] or []],
        f"- Task: {info.task}; classes: {', '.join(info.class_names)}",
        f"- Backbone: {training['backbone']} (weights: {training['weights']}), "
        f"seed {training['seed']}",
        f"- Input: {card['input']['serving_default']}; resized inside to "
        f"{info.image_size[0]}x{info.image_size[1]}",
        *[f"- Tabular input {item}" for item in card["input"]["tabular"]],
        f"- Data: {training['images_per_split']} images per split, fingerprint "
        f"`{training['data_fingerprint']}`",
        f"- Best validation AUROC {training['best_val_auroc']} (epoch {training['best_epoch']})",
    ]
    if metrics:
        auroc = metrics.get("auroc", {}).get("macro")
        lines.append(
            f"- Evaluation ({metrics.get('split', '?')} split, n={metrics.get('n_images')}):"
            f" AUROC {auroc}, accuracy {metrics.get('accuracy')}"
        )
        for name, d in (metrics.get("discrimination") or {}).items():
            if d.get("auroc_ci_delong") and None not in d["auroc_ci_delong"]:
                low, high = d["auroc_ci_delong"]
                lines.append(f"  - {name}: AUROC {d['auroc']:.4f} (95% CI {low:.4f}-{high:.4f})")
    if thresholds:
        lines.append(
            f"- Decision thresholds (chosen on {thresholds['chosen_on']}, applied as "
            f"{thresholds['rule']}), in `{EXPORT_THRESHOLDS}`:"
        )
        for name, points in thresholds["thresholds"].items():
            listed = ", ".join(f"{point} {_threshold_text(t)}" for point, t in points.items())
            lines.append(f"  - {name}: {listed}")
    lines += ["", "## Intended use", card["intended_use"], "", "## Limitations"]
    lines += [f"- {item}" for item in card["limitations"]]
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
    if (target / "saved_model.pb").is_file():
        raise ExportError(
            f"{target} holds a SavedModel directly, which TF Serving cannot load: it needs "
            f"NAME/VERSION/ with VERSION a number. Move that export into a version folder "
            f"(e.g. {target / '1'}) or export to another NAME"
        )
    numbered = [int(p.name) for p in _subfolders(target) if _VERSION.fullmatch(p.name)]
    return target / str(max(numbered, default=0) + 1)


def _subfolders(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []


def _evaluation(run: Run, tta: bool) -> tuple[dict | None, dict | None]:
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
    metrics, thresholds = _evaluation(run, tta)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        model = load_run_model(run)
        if tta:
            model = tta_model(model, mirror=may_mirror(run.info.modality))
        if calibrate:
            model, thresholds = calibrated(model, thresholds, info.task)
        built = staging / "model"
        build_archive(model, info).write_out(str(built), verbose=False)
        card = _write_assets(built, run, info, metrics, thresholds, tta=tta, calibrate=calibrate)
        if target.exists():
            shutil.rmtree(target)
        built.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for found in card["degenerate_model"] or []:
        warnings.warn(f"export {target}: {found}", DegenerateModelWarning, stacklevel=2)
    return target


def _write_assets(
    built: Path,
    run: Run,
    info: ModelInfo,
    metrics: dict | None,
    thresholds: dict | None,
    *,
    tta: bool,
    calibrate: bool,
) -> dict:
    """The files beside the graph: model info, thresholds and the model card (returned)."""
    atomic.write_json(built / EXPORT_INFO, info.to_json())
    if thresholds is not None:
        write_thresholds(built / EXPORT_THRESHOLDS, thresholds)
    markdown, card = model_card(info, run.info, metrics, thresholds)
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
    atomic.write_text(built / "model_card.md", markdown)
    atomic.write_json(built / "model_card.json", card)
    return card
