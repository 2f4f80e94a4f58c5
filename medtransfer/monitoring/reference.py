"""What the model saw before it was deployed: the reference a batch of scores is compared with.

A run directory and an export carry the same reference in different files: the training
profile (the DICOM header values and, from profile version 2, a sample of per-image intensity
means and standard deviations) and the OOD reference (the validation images' sorted OOD scores
and, in later versions, their class probabilities). Only those files are read: nothing here
loads a model, so monitoring stays light enough for a reporting server without TensorFlow.
Whatever a model's version did not record is None, and the checks that need it say so.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medtransfer import export_layout, rundir
from medtransfer.errors import MedtransferError

# Score-table column -> key of the profile's intensity samples (profile version 2)
INTENSITY_SAMPLES = {"intensity_mean": "image_means", "intensity_std": "image_stds"}


class MonitorError(MedtransferError):
    """A model reference or a score table that cannot be monitored; the message says which."""


@dataclass(frozen=True, eq=False)
class MonitorReference:
    """The model's classes and the training and validation distributions batches drift from."""

    source: Path
    kind: str  # "run" or "export"
    classes: list[str]
    positive_class: str | None
    profile: dict[str, Any] | None
    validation_scores: np.ndarray | None  # sorted OOD scores of the validation images
    validation_probabilities: np.ndarray | None  # [N, C], columns in class order

    def reported_classes(self) -> list[str]:
        """The classes whose prevalence is followed: for two classes only the positive one (the
        other's share is its complement), else every class."""
        if len(self.classes) != 2:
            return list(self.classes)
        positive = self.positive_class
        return [positive if positive in self.classes else self.classes[1]]

    def intensity_samples(self, column: str) -> np.ndarray | None:
        """The training images' per-image values of a score-table intensity column (None for a
        version-1 profile, which kept quantiles only)."""
        samples = ((self.profile or {}).get("intensity") or {}).get("samples") or {}
        values = np.asarray(samples.get(INTENSITY_SAMPLES[column]) or [], dtype=np.float64)
        values = values[np.isfinite(values)]
        return values if len(values) else None

    def header_counts(self, tag: str) -> dict[str, int] | None:
        """Training DICOM files per value of a header tag (None without DICOM training data)."""
        if not self.profile or not self.profile.get("dicom_images"):
            return None
        counts = self.profile.get("header", {}).get(tag) or {}
        counts = {str(value): int(count) for value, count in counts.items() if count}
        return counts if sum(counts.values()) > 0 else None


def load_reference(path: str | Path) -> MonitorReference:
    """The reference of the run directory or export at ``path``."""
    source = Path(path)
    if rundir.is_run(source):
        return _from_run(source)
    if export_layout.is_export(source):
        return _from_export(source)
    raise MonitorError(
        f"{source} is neither a medtransfer run directory nor an export (monitor needs the "
        "model that scored the tables)"
    )


def _from_run(source: Path) -> MonitorReference:
    try:
        run = rundir.open_run(source)
        profile, ood = run.profile(), run.ood_reference()
    except MedtransferError as exc:
        raise MonitorError(str(exc)) from None
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MonitorError(
            f"{source}: its profile or OOD reference cannot be read ({exc})"
        ) from None
    ood = ood or {}
    return _checked(
        source, "run", list(run.info.classes), run.info.positive_class, profile,
        ood.get("validation_scores"), ood.get("validation_probabilities"),
    )  # fmt: skip


def _read_json(file: Path, required: bool) -> Any:
    if not file.is_file() and not required:
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise MonitorError(f"{file} cannot be read as JSON ({type(exc).__name__})") from None


def _from_export(source: Path) -> MonitorReference:
    info = _read_json(source / export_layout.EXPORT_INFO, required=True)
    profile = _read_json(source / export_layout.EXPORT_PROFILE, required=False)
    ood = _read_json(source / export_layout.EXPORT_OOD, required=False) or {}
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
        raise MonitorError(f"{source / export_layout.EXPORT_INFO} names no classes")
    if not isinstance(ood, dict):
        raise MonitorError(f"{source / export_layout.EXPORT_OOD} is not an OOD reference")
    return _checked(
        source, "export", [str(c) for c in info["classes"]], info.get("positive_class"), profile,
        ood.get("validation_scores"), ood.get("validation_probabilities"),
    )  # fmt: skip


def _checked(
    source: Path,
    kind: str,
    classes: list[str],
    positive_class: str | None,
    profile: Any,
    scores: Any,
    probabilities: Any,
) -> MonitorReference:
    """The reference, once its arrays are known to have the shapes the checks rely on."""
    if not classes:
        raise MonitorError(f"{source}: the model names no classes")
    if profile is not None and not isinstance(profile, dict):
        raise MonitorError(f"{source}: its training profile is not a JSON object")
    try:
        scores = None if scores is None else np.sort(np.asarray(scores, np.float64).ravel())
        probabilities = None if probabilities is None else np.asarray(probabilities, np.float64)
    except (TypeError, ValueError):
        raise MonitorError(
            f"{source}: its OOD reference holds values that are not numbers"
        ) from None
    if probabilities is not None and (
        probabilities.ndim != 2 or probabilities.shape[1] != len(classes)
    ):
        raise MonitorError(
            f"{source}: validation probabilities of shape {probabilities.shape} do not fit the "
            f"{len(classes)} classes {classes}"
        )
    if scores is not None:
        scores = scores[np.isfinite(scores)]
    if probabilities is not None:
        probabilities = probabilities[np.isfinite(probabilities).all(axis=1)]
    return MonitorReference(
        source, kind, classes, positive_class, profile,
        scores if scores is not None and len(scores) else None,
        probabilities if probabilities is not None and len(probabilities) else None,
    )  # fmt: skip
