"""Where an export keeps what is not the graph: file names under ``assets.extra/``.

Kept apart from ``export.py`` and ``predictor.py`` (both load TensorFlow) so that readers that
need only the JSON beside the graph, such as ``medtransfer monitor``, stay light.
"""

from __future__ import annotations

from pathlib import Path

from medtransfer.rundir import PROFILE_FILE

EXPORT_GRAPH = "saved_model.pb"
MODEL_CARD = "model_card.json"  # beside the graph: model, version, data, metrics, thresholds
# Lean exports (``export --format litert|onnx``): one graph file in place of the SavedModel,
# the same assets beside it.
LEAN_GRAPHS = {"litert": "model.tflite", "onnx": "model.onnx"}
EXPORT_INFO = Path("assets.extra") / "medtransfer.json"  # ModelInfo: classes, image policy
EXPORT_PROFILE = Path("assets.extra") / PROFILE_FILE  # the training profile
# The validation images' sorted OOD scores, and their class probabilities (one row per image)
EXPORT_OOD = Path("assets.extra") / "ood_validation.json"
# A lean export's format, quantisation and the re-check of its thresholds on validation
EXPORT_LEAN = Path("assets.extra") / "lean_export.json"


def lean_graph(path: str | Path) -> tuple[str, Path] | None:
    """The format and graph file of a lean export folder (or of its graph file), else None."""
    source = Path(path)
    folder = source.parent if source.is_file() else source
    for fmt, name in LEAN_GRAPHS.items():
        graph = folder / name
        if graph.is_file() and (folder / EXPORT_INFO).is_file():
            if source.is_file() and source != graph:
                continue
            return fmt, graph
    return None


def holds_graph(path: str | Path) -> bool:
    """Whether ``path`` holds an exported graph of any format directly (SavedModel or lean)."""
    folder = Path(path)
    return (folder / EXPORT_GRAPH).is_file() or any(
        (folder / name).is_file() for name in LEAN_GRAPHS.values()
    )


def is_export(path: str | Path) -> bool:
    """A model directory written by ``medtransfer export`` (a SavedModel or a lean export)."""
    saved = (Path(path) / EXPORT_GRAPH).is_file() and (Path(path) / EXPORT_INFO).is_file()
    return saved or (Path(path).is_dir() and lean_graph(path) is not None)
