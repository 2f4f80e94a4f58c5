"""Where an export keeps what is not the graph: file names under ``assets.extra/``.

Kept apart from ``export.py`` and ``predictor.py`` (both load TensorFlow) so that readers that
need only the JSON beside the graph, such as ``medtransfer monitor``, stay light.
"""

from __future__ import annotations

from pathlib import Path

from medtransfer.rundir import PROFILE_FILE

EXPORT_GRAPH = "saved_model.pb"
EXPORT_INFO = Path("assets.extra") / "medtransfer.json"  # ModelInfo: classes, image policy
EXPORT_PROFILE = Path("assets.extra") / PROFILE_FILE  # the training profile
# The validation images' sorted OOD scores, and their class probabilities (one row per image)
EXPORT_OOD = Path("assets.extra") / "ood_validation.json"


def is_export(path: str | Path) -> bool:
    """A SavedModel directory written by ``medtransfer export``."""
    return (Path(path) / EXPORT_GRAPH).is_file() and (Path(path) / EXPORT_INFO).is_file()
