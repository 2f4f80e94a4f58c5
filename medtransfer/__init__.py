"""medtransfer: transfer learning for medical imaging.

The public API is imported lazily: decode worker processes import ``medtransfer.io`` and must not
pull TensorFlow in with it (forking or spawning a process that has initialised TensorFlow is slow
and can hang), so nothing TensorFlow-backed is imported until it is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Spec": "medtransfer.spec",
    "load_spec": "medtransfer.spec",
    "spec_from_dict": "medtransfer.spec",
    "SpecError": "medtransfer.errors",
    "MedtransferError": "medtransfer.errors",
    "read_dicom": "medtransfer.io",
    "load_image": "medtransfer.io",
    "build_manifest": "medtransfer.data.manifest",
    "data_summary": "medtransfer.data.summary",
    "format_data_summary": "medtransfer.data.summary",
    "load_images": "medtransfer.data.pipeline",
    "make_dataset": "medtransfer.data.pipeline",
    "make_training_dataset": "medtransfer.data.pipeline",
    "BACKBONES": "medtransfer.models.backbones",
    "build_model": "medtransfer.models.build",
    "train": "medtransfer.training.run",
    "open_run": "medtransfer.rundir",
    "load_run_model": "medtransfer.models.saved",
    "load_keras_model": "medtransfer.models.saved",
    "RunInfo": "medtransfer.rundir",
    "train_seeds": "medtransfer.training.seeds",
    "evaluate_seeds": "medtransfer.evaluation.seeds",
    "lr_find": "medtransfer.training.lr_find",
    "lr_find_figure": "medtransfer.training.lr_find",
    "augment_preview_figure": "medtransfer.data.preview",
    "make_augmenter": "medtransfer.data.augment",
    "download_weights": "medtransfer.models.weights",
    "evaluate": "medtransfer.evaluation.report",
    "assess": "medtransfer.evaluation.assessment",
    "write_report": "medtransfer.evaluation.report_files",
    "read_thresholds": "medtransfer.evaluation.thresholds",
    "roc_figure": "medtransfer.evaluation.plots",
    "reliability_figure": "medtransfer.evaluation.plots",
    "ClinicalSettings": "medtransfer.evaluation.clinical",
    "compare_reports": "medtransfer.evaluation.compare",
    "create_ensemble": "medtransfer.training.ensemble",
    "history_figure": "medtransfer.evaluation.plots",
    "image_grid_figure": "medtransfer.data.preview",
    "export_model": "medtransfer.export",
    "load_predictor": "medtransfer.predictor",
    "score_folder": "medtransfer.scoring",
    "inspect_folder": "medtransfer.inspect",
    "site_report": "medtransfer.evaluation.sites",
    "CT_WINDOWS": "medtransfer.io.dicom",
    "run_quickstart": "medtransfer.quickstart",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
