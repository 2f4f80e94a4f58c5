"""One way to run inference, whatever the model source: a run directory or an exported model.

Evaluation and batch scoring both go through a predictor, so they run exactly the model that
will be (or was) handed to TF Serving, with the window and frame policy it was trained with.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf

from medtransfer.data.tabular import model_inputs
from medtransfer.errors import ExportError
from medtransfer.export_layout import (
    EXPORT_GRAPH,
    EXPORT_INFO,
    EXPORT_OOD,
    EXPORT_PROFILE,
    lean_graph,
)
from medtransfer.models.inputs import Inputs, input_count, take_rows, to_model_input
from medtransfer.models.ood import with_ood_score
from medtransfer.models.saved import load_run_model
from medtransfer.models.tta import may_mirror, tta_model
from medtransfer.rundir import RUN_FILE, ImagePolicy, RunInfo, is_run, open_run
from medtransfer.spec import TabularFeature


@dataclass(frozen=True)
class ModelInfo:
    """What a consumer must know about a model besides its weights."""

    name: str
    task: str
    class_names: list[str]
    positive_class: str | None
    image_size: tuple[int, int]
    channels: int
    window: str | dict[str, float]
    frames: str
    tabular: tuple[TabularFeature, ...] = field(default=())
    # what the training images were (medtransfer.data.profile); None for older models
    profile: dict[str, Any] | None = field(default=None, compare=False)
    # the validation images' sorted OOD scores (medtransfer.models.ood); None: no OOD score
    ood_validation: np.ndarray | None = field(default=None, compare=False)

    @classmethod
    def from_run_info(cls, info: RunInfo) -> ModelInfo:
        return cls._of(
            info.name, info.task, info.classes, info.positive_class, info.image, info.tabular
        )

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ModelInfo:
        """What :meth:`to_json` wrote (an export's ``assets.extra/medtransfer.json``)."""
        image = ImagePolicy.from_json(record["image"])
        tabular = record.get("tabular") or []
        return cls._of(
            record["name"], record["task"], record["classes"], record.get("positive_class"),
            image, tabular,
        )  # fmt: skip

    @classmethod
    def _of(cls, name, task, classes, positive_class, image: ImagePolicy, tabular) -> ModelInfo:
        return cls(
            name=name,
            task=task,
            class_names=list(classes),
            positive_class=positive_class,
            image_size=image.size,
            channels=image.channels,
            window=image.window,
            frames=image.frames,
            tabular=tuple(TabularFeature(**feature) for feature in tabular),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "classes": self.class_names,
            "positive_class": self.positive_class,
            "image": {
                "size": list(self.image_size),
                "channels": self.channels,
                "window": self.window,
                "frames": self.frames,
            },
            "tabular": [feature.model_dump(mode="json") for feature in self.tabular],
        }


class Predictor:
    """Probabilities for decoded images; subclasses provide ``predict_batch``."""

    def __init__(self, info: ModelInfo, batch_size: int = 32):
        self.info = info
        self.batch_size = batch_size

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    @property
    def window(self) -> str | dict[str, float]:
        return self.info.window

    @property
    def frames(self) -> str:
        return self.info.frames

    @property
    def tabular(self) -> tuple[TabularFeature, ...]:
        return self.info.tabular

    @property
    def profile(self) -> dict[str, Any] | None:
        return self.info.profile

    @property
    def image_size(self) -> tuple[int, int]:
        return self.info.image_size

    @property
    def channels(self) -> int:
        return self.info.channels

    @property
    def ood_validation(self) -> np.ndarray | None:
        """The validation images' sorted OOD scores (None: the model computes none)."""
        return self.info.ood_validation

    def predict(
        self,
        images: list[np.ndarray],
        tabular: Mapping[str, Sequence[float | str]] | None = None,
    ) -> np.ndarray:
        """Decoded images of any size ([H, W] or [H, W, 3] in [0, 1]) -> [N, K] probabilities.

        A model with tabular inputs takes their parsed values (``medtransfer.data.tabular``)
        as ``tabular``, one sequence per feature name; a feature left out is missing.
        """
        return self.predict_with_ood(images, tabular)[0]

    def predict_with_ood(
        self,
        images: list[np.ndarray],
        tabular: Mapping[str, Sequence[float | str]] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``predict``, and each image's OOD score from the same pass (``medtransfer.models.ood``;
        None when the model has no OOD reference)."""
        batch = to_model_input(images, self.info.image_size, self.info.channels)
        if not self.tabular:
            return self._in_chunks(batch)
        given = tabular or {}
        blank = {
            f.name: [np.nan if f.type == "numeric" else ""] * len(images) for f in self.tabular
        }
        return self._in_chunks({"image": batch, **model_inputs(blank | dict(given), self.tabular)})

    def predict_batch(self, batch: Inputs) -> np.ndarray:
        """Model-ready inputs ([N, H, W, C] images, or named arrays with tabular features) ->
        [N, K] probabilities, in chunks of batch_size."""
        return self._in_chunks(batch)[0]

    def _in_chunks(self, batch: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        parts = [
            self._predict_chunk(take_rows(batch, slice(i, i + self.batch_size)))
            for i in range(0, input_count(batch), self.batch_size)
        ]
        if not parts:
            return np.zeros((0, len(self.class_names)), np.float32), None
        scores = [ood for _, ood in parts]
        ood = None if scores[0] is None else np.concatenate(scores)
        return np.concatenate([probs for probs, _ in parts]), ood

    def _predict_chunk(self, chunk: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError


class KerasPredictor(Predictor):
    """Calls the model through one ``tf.function``: an eager call runs op by op and measured
    2.5x slower than ``model.predict`` on EfficientNetB0 (benchmarks/RESULTS.md, "Scoring").
    ``reduce_retracing`` makes a second batch size (the last, shorter chunk) trace once with an
    open batch dimension that then serves every size."""

    def __init__(
        self,
        model,
        info: ModelInfo,
        batch_size: int = 32,
        ood_reference: Mapping[str, np.ndarray] | None = None,
    ):
        if ood_reference is not None:
            info = replace(info, ood_validation=ood_reference["validation_scores"])
        super().__init__(info, batch_size)
        self.model = model
        self._scoring = model if ood_reference is None else with_ood_score(model, ood_reference)
        self._call = tf.function(self._inference, reduce_retracing=True)

    def _inference(self, inputs: Inputs):
        return self._scoring(inputs, training=False)

    def _predict_chunk(self, chunk: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        if isinstance(chunk, dict):  # strings need TensorFlow tensors (numpy ones are objects)
            chunk = {name: tf.constant(values) for name, values in chunk.items()}
        else:
            chunk = tf.constant(chunk)
        out = self._call(chunk)
        if isinstance(out, dict):
            return out["probabilities"].numpy(), out["ood_score"].numpy()
        return out.numpy(), None


class SavedModelPredictor(Predictor):
    """Through the ``serving_default`` signature, as TF Serving calls it: tabular features
    are flat [batch] tensors there (one value per instance in a REST request)."""

    def __init__(self, path: Path, info: ModelInfo, batch_size: int = 32):
        super().__init__(info, batch_size)
        self._loaded = tf.saved_model.load(str(path))
        self._serve = self._loaded.signatures["serving_default"]

    def _predict_chunk(self, chunk: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        named = chunk if isinstance(chunk, dict) else {"image": chunk}
        arguments = {"image": tf.constant(named["image"], tf.float32)}
        for feature in self.tabular:
            arguments[feature.name] = tf.constant(named[feature.name].reshape(-1))
        out = self._serve(**arguments)
        ood = out["ood_score"].numpy() if "ood_score" in out else None
        return out["probabilities"].numpy(), ood


class LiteRTPredictor(Predictor):
    """Through a LiteRT (``.tflite``) graph with the ``ai-edge-litert`` interpreter (TensorFlow's
    own ``tf.lite.Interpreter`` is deprecated). The graph takes images at exactly the model's
    size, which ``predict`` already resizes to outside it; it computes no OOD score."""

    def __init__(self, path: Path, info: ModelInfo, batch_size: int = 32):
        super().__init__(info, batch_size)
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ExportError(
                f"{path} is a LiteRT model: install medtransfer's lean extra "
                "(pip install 'medtransfer[lean]') to run it"
            ) from None
        self._interpreter = Interpreter(model_path=str(path), num_threads=_cpu_threads())
        self._runner = self._interpreter.get_signature_runner()
        self._input = next(iter(self._runner.get_input_details()))
        self._output = next(iter(self._runner.get_output_details()))

    def _predict_chunk(self, chunk: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.ascontiguousarray(_images_only(chunk), np.float32)
        return self._runner(**{self._input: images})[self._output].astype(np.float32), None


class OnnxPredictor(Predictor):
    """Through an ONNX graph with ONNX Runtime on the CPU. Like the LiteRT graph it takes images
    at the model's size and computes no OOD score."""

    def __init__(self, path: Path, info: ModelInfo, batch_size: int = 32):
        super().__init__(info, batch_size)
        try:
            import onnxruntime
        except ImportError:
            raise ExportError(
                f"{path} is an ONNX model: install medtransfer's lean extra "
                "(pip install 'medtransfer[lean]') to run it"
            ) from None
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = _cpu_threads()
        options.log_severity_level = 3
        self._session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self._input = self._session.get_inputs()[0].name

    def _predict_chunk(self, chunk: Inputs) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.ascontiguousarray(_images_only(chunk), np.float32)
        return self._session.run(None, {self._input: images})[0].astype(np.float32), None


def _images_only(chunk: Inputs) -> np.ndarray:
    if isinstance(chunk, dict):  # lean exports refuse tabular models; guard an edited folder
        raise ExportError("a lean export takes images only, not tabular features")
    return chunk


def _cpu_threads() -> int:
    """The cores this process may use (TensorFlow uses them all for the SavedModel too)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _export_info(folder: Path) -> ModelInfo:
    """An export's ModelInfo from the assets beside its graph: classes, image policy, profile
    and (where the graph computes one) the validation OOD scores."""
    info_file = folder / EXPORT_INFO
    if not info_file.is_file():
        raise ExportError(f"{folder} holds a model graph without {EXPORT_INFO}")
    info = ModelInfo.from_json(json.loads(info_file.read_text()))
    profile_file = folder / EXPORT_PROFILE
    if profile_file.is_file():
        info = replace(info, profile=json.loads(profile_file.read_text()))
    ood_file = folder / EXPORT_OOD
    if ood_file.is_file():
        scores = json.loads(ood_file.read_text())["validation_scores"]
        info = replace(info, ood_validation=np.asarray(scores, np.float32))
    return info


_LEAN_PREDICTORS = {"litert": LiteRTPredictor, "onnx": OnnxPredictor}


def load_predictor(path: str | Path, batch_size: int = 32, *, tta: bool = False) -> Predictor:
    """A predictor for a run directory (``run.json``), a SavedModel export (``saved_model.pb``)
    or a lean export (``model.tflite`` / ``model.onnx``, the folder or the file itself).

    ``tta`` averages a run's model over test-time views (``medtransfer.models.tta``); an
    export is a fixed graph, so TTA there is chosen when exporting (``export --tta``).
    """
    source = Path(path)
    if is_run(source):
        run = open_run(source)
        model = load_run_model(run)
        if tta:
            model = tta_model(model, mirror=may_mirror(run.info.modality))
        info = replace(ModelInfo.from_run_info(run.info), profile=run.profile())
        # TTA averages views, so one view's features would not describe its output
        reference = None if tta else run.ood_reference()
        return KerasPredictor(model, info, batch_size, ood_reference=reference)
    if tta:
        raise ExportError(
            f"{source}: test-time augmentation needs the run directory (or an export made "
            "with export --tta, which has it built in)"
        )
    if (source / EXPORT_GRAPH).is_file():
        return SavedModelPredictor(source, _export_info(source), batch_size)
    if (lean := lean_graph(source)) is not None:
        fmt, graph = lean
        return _LEAN_PREDICTORS[fmt](graph, _export_info(graph.parent), batch_size)
    raise ExportError(
        f"{source} is neither a run directory ({RUN_FILE}) nor an exported model "
        "(saved_model.pb, model.tflite or model.onnx)"
    )
