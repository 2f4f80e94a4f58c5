"""Lean exports of a run: one LiteRT (``.tflite``) or ONNX file in place of the SavedModel.

For sites without a GPU, edge devices, and serving stacks that run ONNX. The graph is the run's
Keras model with its preprocessing (channel adapter, the backbone's own normalisation) inside,
as in the SavedModel, but its input is fixed at the model's image size: LiteRT has no kernel for
the antialiased resize (``tf.ScaleAndTranslate``), and at the model's own size that resize is
the identity, so the lean graph holds an identity there and every reader resizes outside the
graph, as medtransfer's predictor already does for all models. The conversion is Keras'
``model.export(format="litert" | "onnx")``; LiteRT takes float16 weights or int8 post-training
quantisation calibrated on the run's own validation images (a representative dataset). Where
full-integer int8 changes the model's decisions, the layers whose int8 error is worst (TF's
quantisation debugger) stay float32 and the rest stays int8, before weights-only int8.

A lean graph computes slightly different probabilities, so the evaluation's thresholds are
re-chosen on the lean model's validation predictions (same rules and settings) and replace the
exported ones where they move; the re-check is recorded in ``assets.extra/lean_export.json``
and in the model card. The OOD score is not carried: lean exports output probabilities only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from medtransfer import atomic
from medtransfer.data.pipeline import load_images
from medtransfer.errors import ExportError, MedtransferError
from medtransfer.evaluation.clinical import ClinicalSettings, choose_operating_points
from medtransfer.export import (
    has_class,
    kept_evaluation,
    publish_version,
    version_dir,
    write_assets,
)
from medtransfer.export_layout import EXPORT_INFO, EXPORT_LEAN, LEAN_GRAPHS
from medtransfer.models.layers import ModelResizing
from medtransfer.models.saved import load_run_model
from medtransfer.predictor import ModelInfo, load_predictor
from medtransfer.rundir import Run, open_run

FORMATS = ("saved_model", "litert", "onnx")
QUANTIZATIONS = ("none", "float16", "int8")
CALIBRATION_IMAGES = 256  # int8: at most this many validation images calibrate the ranges
SAME_GRAPH_TOLERANCE = 1e-5  # the lean graph (float32) against the run's model, before converting
_MOVED = 1e-6  # a re-chosen threshold further than this from the original has moved
# int8 schemes, tried in order: full integer (weights and activations, calibrated), then
# selective (the same calibration, the layers of worst int8 error kept float32), then weights
# only (activations quantised on the fly); the first whose decisions agree with the Keras
# model's on this share of the validation images is kept, else int8 is refused. The share is a
# point above the 98% that decisions on new images should keep: validation sets are small (at
# 78 images, 98% lets one decision flip, and the full-integer BreastMNIST graph that flipped one
# there flipped 4 of 156 test images, 97.4%, where the graph with 4 layers float flipped 1)
INT8_SCHEMES = ("int8", "int8_selective", "int8_weights")
INT8_MIN_AGREEMENT = 0.99
SELECTIVE_MAX_FLOAT = 0.5  # int8_selective keeps at most this share of the layers float32
_SCHEMES = ("none", "float16", "int8", "int8_weights")  # what :func:`convert` writes alone


def check_choice(fmt: str, quantize: str) -> None:
    """Refuse a format or quantisation this export cannot make, before any work is done."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: one of {', '.join(FORMATS)}")
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantisation {quantize!r}: one of {', '.join(QUANTIZATIONS)}")
    if quantize != "none" and fmt != "litert":
        raise ExportError(
            f"--quantize {quantize} applies to --format litert only; {fmt} is exported in float32"
        )


def lean_model(model: keras.Model, info: ModelInfo) -> keras.Model:
    """The run's model with its input fixed at ``info.image_size`` and the model's own resize
    (there the identity) replaced by one, the weights shared. Image-only models: a lean graph
    takes one image tensor, so a model with tabular inputs stays a SavedModel."""
    if info.tabular or isinstance(model.input, dict):
        raise ExportError(
            "lean formats (litert, onnx) take image-only models; this one also takes tabular "
            "features: export it as a SavedModel (--format saved_model)"
        )
    size = tuple(int(s) for s in info.image_size)
    image = keras.Input((*size, info.channels), name="image")

    def same_size_resize_is_identity(layer: keras.layers.Layer) -> keras.layers.Layer:
        if isinstance(layer, ModelResizing) and (layer.height, layer.width) == size:
            return keras.layers.Identity(name=layer.name)
        return layer

    try:
        lean = keras.models.clone_model(
            model, input_tensors=image, clone_function=same_size_resize_is_identity, recursive=True
        )
    except (ValueError, TypeError) as exc:
        raise ExportError(f"cannot build a fixed-size graph of this model: {exc}") from None
    _check_same(model, lean, size, info.channels)
    return lean


def _check_same(model: keras.Model, lean: keras.Model, size: tuple, channels: int) -> None:
    """The lean graph must compute what the run's model computes on model-size images."""
    images = np.random.default_rng(0).random((4, *size, channels), dtype=np.float32)
    got = lean.predict(images, verbose=0)
    want = model.predict(images, verbose=0)
    if (difference := float(np.abs(got - want).max())) > SAME_GRAPH_TOLERANCE:
        raise ExportError(
            f"the fixed-size graph differs from the run's model by {difference:.2g} on "
            "model-size images (a resize at another size inside it?): export a SavedModel"
        )


def _litert_options(quantize: str, calibration: np.ndarray | None) -> dict:
    """``TFLiteConverter`` settings for Keras' LiteRT export. Builtin ops only: the flex
    (select TF) ops Keras also allows need TensorFlow at inference, which a lean model avoids."""
    builtins = tf.lite.OpsSet.TFLITE_BUILTINS
    if quantize == "none":
        return {"target_spec": {"supported_ops": [builtins]}}
    if quantize == "float16":
        return {
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "target_spec": {"supported_ops": [builtins], "supported_types": [tf.float16]},
        }
    if quantize == "int8_weights":  # dynamic range: no representative dataset
        return {
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "target_spec": {"supported_ops": [builtins]},
        }
    # int8 weights and activations where a kernel exists (float elsewhere); float32 input and
    # output, so the predictor feeds the same [0, 1] pixels to every format
    return {
        "optimizations": [tf.lite.Optimize.DEFAULT],
        "representative_dataset": representative_dataset(calibration),
        "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, builtins]},
    }


def representative_dataset(images: np.ndarray | None) -> Callable[[], Iterator[list]]:
    """The converter's calibration input: validation images one at a time, as a list of
    [1, H, W, C] arrays (one per graph input)."""
    if images is None or len(images) == 0:
        raise ExportError("int8 quantisation needs the run's validation images to calibrate")

    def generate() -> Iterator[list]:
        for image in images[:CALIBRATION_IMAGES]:
            yield [image[None].astype(np.float32)]

    return generate


def convert(
    lean: keras.Model,
    path: Path,
    fmt: str,
    quantize: str = "none",
    calibration: np.ndarray | None = None,
) -> Path:
    """Write ``lean`` (see :func:`lean_model`) as a LiteRT or ONNX file at ``path``;
    ``quantize`` is one of ``none``, ``float16``, ``int8`` (full integer, calibrated on
    ``calibration``) or ``int8_weights`` (weights only) for LiteRT."""
    if quantize not in _SCHEMES or fmt not in LEAN_GRAPHS or (fmt == "onnx" and quantize != "none"):
        check_choice(fmt, quantize)
        raise ExportError(f"{fmt} cannot be written with quantisation {quantize!r}")
    options = {} if fmt == "onnx" else _litert_options(quantize, calibration)
    with _conversion_errors(fmt), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # tf2onnx touches np.object
        lean.export(
            str(path), format=fmt, input_signature=_signature(lean), verbose=False, **options
        )
    return path


def _signature(lean: keras.Model) -> list[tf.TensorSpec]:
    """The lean graph's one input: a batch of images at the model's size."""
    return [tf.TensorSpec((None, *lean.input.shape[1:]), tf.float32, name="image")]


@contextlib.contextmanager
def _conversion_errors(fmt: str) -> Iterator[None]:
    """Name a failed conversion's cause in an ExportError (the converters raise their own
    types), and a missing converter package as the lean extra to install."""
    try:
        yield
    except ExportError:
        raise
    except ImportError as exc:
        raise ExportError(
            f"{fmt} export needs medtransfer's lean extra (pip install 'medtransfer[lean]'): {exc}"
        ) from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"{fmt} conversion failed: {first[:400]}") from None


@contextlib.contextmanager
def _tflite_interpreter_allowed() -> Iterator[None]:
    """TF's quantisation debugger runs its models in ``tf.lite.Interpreter``, which warns that
    it is deprecated for LiteRT's (the predictor runs LiteRT's); the warning is not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter", UserWarning)
        yield


def int8_debugger(
    lean: keras.Model, calibration: np.ndarray
) -> tf.lite.experimental.QuantizationDebugger:
    """Calibrate full-integer int8 of ``lean`` on ``calibration`` once, in TensorFlow's
    quantisation debugger (``tf.lite.experimental.QuantizationDebugger``): from its calibrated
    model it makes the full-integer graph and any selective one (named layers left float32)
    without calibrating again, and it measures each layer's int8 error on those images.

    The debugger takes the ``TFLiteConverter`` itself, which Keras' ``model.export`` keeps
    inside, so the converter is built as Keras builds it (the graph written by an
    ``ExportArchive``, then ``from_saved_model``) with the settings of ``--quantize int8``."""
    options = _litert_options("int8", calibration)
    with _conversion_errors("litert"), tempfile.TemporaryDirectory() as saved:
        archive = keras.export.ExportArchive()
        archive.track(lean)
        call = functools.partial(lean.__call__, training=False)
        archive.add_endpoint("serve", call, input_signature=_signature(lean))
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved)
        converter.experimental_enable_resource_variables = True  # as Keras' exporter sets
        converter.optimizations = options["optimizations"]
        converter.representative_dataset = options["representative_dataset"]
        converter.target_spec.supported_ops = options["target_spec"]["supported_ops"]
        with _tflite_interpreter_allowed():
            return tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=representative_dataset(calibration)
            )


def worst_layers(debugger: tf.lite.experimental.QuantizationDebugger) -> list[dict]:
    """The debugger's int8 layers, worst first by RMSE / scale, the measure of TF's debugger
    guide: the root-mean-square error of a layer's int8 output against the float layer fed the
    same input, in units of its quantisation step, over the calibration images. Rounding
    alone gives about 0.29 (1/sqrt(12)); a layer that int8 breaks (a kernel that misreads
    its scales, weights whose range drowns the small ones) scores far higher. Empty when the
    interpreter cannot run the debugger's graph: there is then no ranking to go by."""
    try:
        with _tflite_interpreter_allowed():
            debugger.run()
    except RuntimeError:
        return []
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    stats = pd.read_csv(dump)
    stats["score"] = np.sqrt(stats["mean_squared_error"]) / stats["scale"]
    stats = stats.sort_values("score", ascending=False, kind="stable")
    return [
        {"op": row.op_name, "tensor": row.tensor_name, "rmse_per_scale": round(row.score, 3)}
        for row in stats.itertuples()
    ]


def denylist_sizes(layers: int) -> list[int]:
    """How many of the worst layers int8_selective keeps float32 at each try: 1, 2, 4, ...,
    at most :data:`SELECTIVE_MAX_FLOAT` of the layers (past that, weights-only int8 is the
    smaller model)."""
    most = max(1, int(layers * SELECTIVE_MAX_FLOAT)) if layers else 0
    return [2**k for k in range(most.bit_length())]


def int8_op_share(graph: Path) -> float:
    """Share of a LiteRT graph's operations that compute in int8 (an int8 output; QUANTIZE and
    DEQUANTIZE, the conversions, not counted): 1.0 is full integer; weights-only int8 is 0.0,
    its activations stay float (its kernels quantise them on the fly)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(  # no delegate: it would merge the operations into one node
        model_path=str(graph),
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    dtypes = {t["index"]: t["dtype"] for t in interpreter.get_tensor_details()}
    ops = [
        op
        for op in interpreter._get_ops_details()  # the op list has no public accessor
        if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")
    ]
    int8 = sum(dtypes[op["outputs"][0]] == np.int8 for op in ops)
    return round(int8 / len(ops), 3) if ops else 0.0


def validation_data(run: Run, info: ModelInfo) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's validation images at the model's size and their [N, K] targets, from the
    run's manifest; None when the run has no manifest, no validation split, or its images
    cannot be read here (a run copied without its data)."""
    return split_data(run, info, "val")


def split_data(run: Run, info: ModelInfo, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    """One split of the run's own manifest as images at the model's size and [N, K] targets
    (None as for :func:`validation_data`); the benchmark reads the test split through it."""
    try:
        manifest = run.manifest()
    except (FileNotFoundError, KeyError):
        return None
    rows = manifest[manifest["split"].astype(str) == split]
    if rows.empty:
        return None
    try:
        images = load_images(
            rows, info.image_size, info.channels, window=info.window, frames=info.frames,
            workers=0, progress=False, label=f"decoding {split} images",
        )  # fmt: skip
    except (OSError, MedtransferError, ValueError):
        return None
    return images, _targets(rows["label"].astype(str), info)


def _targets(labels: pd.Series, info: ModelInfo) -> np.ndarray:
    columns = [has_class(labels, name, info.task).to_numpy() for name in info.class_names]
    return np.stack(columns, axis=1).astype(np.float32)


def _decisions(probabilities: np.ndarray, info: ModelInfo) -> np.ndarray:
    """Each image's decision without thresholds: the top class (>= 0.5 per class, multilabel)."""
    if info.task == "multilabel":
        return probabilities >= 0.5
    return np.argmax(probabilities, axis=1)


def _agreement(p_keras: np.ndarray, p_lean: np.ndarray, info: ModelInfo, chosen: dict) -> dict:
    """Share of images with the same decision from both models: per class and operating point
    at the thresholds chosen for the Keras model, and for the thresholdless decision."""
    same = {"top_class": float(np.mean(_decisions(p_keras, info) == _decisions(p_lean, info)))}
    for name, points in chosen.items():
        k = info.class_names.index(name)
        for point, t in points.items():
            agree = (p_keras[:, k] >= t) == (p_lean[:, k] >= t)
            same[f"{name}:{point}"] = float(np.mean(agree))
    return same


def _moved(before: dict, after: dict) -> bool:
    """Whether any threshold differs (both +inf, no image called positive, is the same)."""
    for name, points in {**before, **after}.items():
        for point in points:
            a = before.get(name, {}).get(point)
            b = after.get(name, {}).get(point)
            if a is None or b is None:
                return True
            if not (a == b or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= _MOVED)):
                return True
    return False


def recheck(
    y_val: np.ndarray,
    p_keras: np.ndarray,
    p_lean: np.ndarray,
    info: ModelInfo,
    thresholds: dict | None,
) -> tuple[dict | None, dict]:
    """The thresholds the lean export ships, and the re-check record.

    Operating points are chosen again, with the evaluation's rules and settings, on both
    models' validation predictions; where the lean model's differ from the Keras model's, the
    lean model gets its own (``moved``). Without an evaluation there are no thresholds, and the
    record holds only the agreement of the two models' decisions.
    """
    record: dict = {
        "split": "val",
        "images": len(y_val),
        "max_abs_difference": round(float(np.abs(p_lean - p_keras).max()), 7),
    }
    if thresholds is None:
        record["decision_agreement"] = _agreement(p_keras, p_lean, info, {})
        return None, {**record, "thresholds": "not evaluated: no thresholds to re-check"}
    settings = ClinicalSettings(**thresholds.get("settings", {}))
    args = (info.class_names, info.task, info.positive_class, settings)
    keras_points = choose_operating_points(y_val, p_keras, *args)
    lean_points = choose_operating_points(y_val, p_lean, *args)
    moved = _moved(keras_points, lean_points)
    record["decision_agreement"] = _agreement(p_keras, p_lean, info, keras_points)
    record["thresholds_keras"] = keras_points
    record["thresholds_lean"] = lean_points
    record["moved"] = moved
    if not moved:
        return thresholds, record
    shipped = {**thresholds, "thresholds": lean_points, "chosen_for": "this lean model"}
    return shipped, record


def export_lean(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    fmt: str,
    quantize: str = "none",
    overwrite: bool = False,
    int8_schemes: Sequence[str] = INT8_SCHEMES,
) -> Path:
    """Write a lean export (``NAME/VERSION/model.tflite`` or ``model.onnx``, assets and model
    card as for the SavedModel) atomically, and return the version folder used.

    ``int8`` needs the run's validation images (calibration and the thresholds' re-check) and
    is refused without them; the other formats are re-checked when the images are readable.
    ``int8_schemes`` are the int8 schemes to try, in order (a subset of :data:`INT8_SCHEMES`;
    the benchmark measures each alone).
    """
    check_choice(fmt, quantize)
    if fmt == "saved_model":
        raise ExportError("a SavedModel is written by medtransfer.export.export_model")
    if not int8_schemes or set(int8_schemes) - set(INT8_SCHEMES):
        raise ExportError(f"int8 schemes are some of {', '.join(INT8_SCHEMES)}: {int8_schemes}")
    run = open_run(run_dir)
    target = version_dir(out_dir)
    if atomic.is_occupied(target) and not overwrite:
        raise ExportError(f"{target} exists; versions are immutable (use a new version number)")
    info = ModelInfo.from_run_info(run.info)
    model = load_run_model(run)
    lean = lean_model(model, info)
    validation = validation_data(run, info)
    if quantize == "int8" and validation is None:
        raise ExportError(
            f"int8 quantisation is calibrated on the run's validation images, and {run.path} "
            "cannot give them (no manifest or validation split, or its images are not readable "
            "here): export float16 or onnx, or export where the run's data is"
        )
    schemes = tuple(int8_schemes) if quantize == "int8" else (quantize,)

    def build(built: Path) -> dict:
        built.mkdir()
        return _build(built, run, info, model, lean, validation, fmt, schemes)

    return publish_version(target, build)


def _build(
    built: Path,
    run: Run,
    info: ModelInfo,
    model: keras.Model,
    lean: keras.Model,
    validation: tuple[np.ndarray, np.ndarray] | None,
    fmt: str,
    schemes: tuple[str, ...],
) -> dict:
    """Convert into ``built``, re-check on validation, write the assets; the card returned."""
    images = None if validation is None else validation[0]
    atomic.write_json(built / EXPORT_INFO, info.to_json())  # the predictor reads it
    p_keras = None if images is None else model.predict(images, batch_size=32, verbose=0)
    graph, scheme, p_lean, details = _convert_checked(lean, built, fmt, schemes, images, p_keras)
    metrics, thresholds = kept_evaluation(run, False)
    calibrated = scheme in ("int8", "int8_selective")
    record = {
        "format": fmt,
        "quantize": "int8" if scheme.startswith("int8") else scheme,
        "scheme": scheme,
        **details,
        "graph": graph.name,
        "bytes": graph.stat().st_size,
        "input": f"image: float32 [batch, {info.image_size[0]}, {info.image_size[1]}, "
        f"{info.channels}] in [0, 1], already at the model's size (resize outside the graph)",
        "output": f"probabilities: float32 [batch, {len(info.class_names)}]; no OOD score",
        "calibration_images": min(len(images), CALIBRATION_IMAGES) if calibrated else 0,
    }
    if validation is None:
        record["recheck"] = "not done: the run's validation images are not readable here"
    else:
        thresholds, record["recheck"] = recheck(validation[1], p_keras, p_lean, info, thresholds)
    atomic.write_json(built / EXPORT_LEAN, record)
    return write_assets(built, run, info, metrics, thresholds, lean=record)


def _convert_checked(
    lean: keras.Model,
    built: Path,
    fmt: str,
    schemes: tuple[str, ...],
    images: np.ndarray | None,
    p_keras: np.ndarray | None,
) -> tuple[Path, str, np.ndarray | None, dict]:
    """Convert, and for int8 keep the first graph of :func:`_int8_graphs` whose validation
    decisions agree with the Keras model's on at least :data:`INT8_MIN_AGREEMENT` of the
    images: full-integer int8 can break a model (an op whose int8 kernel misreads its scales,
    activations or weights of a wide range, as in a network trained from scratch), which its
    validation predictions show. Returns the graph, the scheme kept, its validation
    probabilities and the record's details: each tried graph's agreement (``tried``; an
    ``int8_selective:N`` graph kept N layers float32; a graph LiteRT cannot run agrees on
    none) and, for int8, the layers kept float32 (``denylisted``) and the share of operations
    computed in int8 (``int8_ops``)."""
    path = built / LEAN_GRAPHS[fmt]
    if not schemes[0].startswith("int8"):
        convert(lean, path, fmt, schemes[0])
        p_lean = None if images is None else load_predictor(built).predict_batch(images)
        return path, schemes[0], p_lean, {"tried": {}}
    tried: dict[str, float] = {}
    for scheme, denylisted in _int8_graphs(lean, path, schemes, images):
        try:
            p_lean = load_predictor(built).predict_batch(images)
        except RuntimeError:  # LiteRT cannot prepare it (a rescale beyond its kernels' range)
            p_lean = None
        agree = 0.0 if p_lean is None else float(np.mean(p_lean.argmax(1) == p_keras.argmax(1)))
        tried[scheme if denylisted is None else f"{scheme}:{len(denylisted)}"] = round(agree, 4)
        if agree >= INT8_MIN_AGREEMENT:
            float_layers = denylisted or []
            details = {"tried": tried, "denylisted": float_layers, "int8_ops": int8_op_share(path)}
            return path, scheme, p_lean, details
    raise ExportError(
        f"int8 quantisation changes this model's decisions: they agree with the Keras model's "
        f"on {', '.join(f'{v:.1%} ({k})' for k, v in tried.items())} of the validation images, "
        f"below {INT8_MIN_AGREEMENT:.0%}: export float16 instead"
    )


def _int8_graphs(
    lean: keras.Model, path: Path, schemes: tuple[str, ...], images: np.ndarray
) -> Iterator[tuple[str, list[dict] | None]]:
    """Write the int8 graphs of ``schemes`` to ``path`` one after another, the most integer
    first, each yielded with the layers it keeps float32 (None: not a selective graph); the
    caller stops at the first that passes. Full integer and selective share one calibration:
    ``int8_selective`` keeps the 1, 2, 4, ... layers of worst int8 error (:func:`worst_layers`)
    float32 and every other layer full integer, so a model that int8 breaks in a few places
    still ships calibrated int8 activations, before falling back to weights only."""
    if "int8" in schemes or "int8_selective" in schemes:
        debugger = int8_debugger(lean, images)
        if "int8" in schemes:
            with _conversion_errors("litert"):
                path.write_bytes(debugger.get_nondebug_quantized_model())
            yield "int8", None
        if "int8_selective" in schemes:
            ranked = worst_layers(debugger)
            for n in denylist_sizes(len(ranked)):
                denylist = [layer["tensor"] for layer in ranked[:n]]
                with _conversion_errors("litert"), _tflite_interpreter_allowed():
                    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
                        denylisted_nodes=denylist
                    )
                    path.write_bytes(debugger.get_nondebug_quantized_model())
                yield "int8_selective", ranked[:n]
    if "int8_weights" in schemes:
        convert(lean, path, "litert", "int8_weights")
        yield "int8_weights", None
