"""Scope checks: is a scored image the kind of image the model was trained on?

Each scored file's header (``medtransfer.data.profile.normalized_header``) is compared with the
model's training profile. The verdict is ``yes``, ``no: <reasons>`` or ``unknown: <why>``:

- ``no`` when the header says the image is something the training images were not: another
  modality (projection radiographs, CR and DX, count as one), another body part (THORAX and
  LUNG count as CHEST), a secondary
  capture (a screenshot or a scan of film) or a localizer (scout) when training had none, a
  colour image for a model trained on greyscale ones.
- ``unknown`` when there is nothing to compare: a file without a DICOM header scored by a model
  trained on DICOM files, or a model whose run predates training profiles.
- ``yes`` otherwise, including models trained on files without headers (PNG, MedMNIST), where
  the header rules have nothing to say.

A tag missing from the scored file is not held against it; a tag missing from every training
file is not checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

IN_SCOPE = "yes"
NO_PROFILE = "unknown: the model has no training profile (trained before medtransfer recorded one)"
NO_HEADER = "unknown: not a DICOM file, so its modality and body part cannot be checked"
# Modalities that are one kind of image for a model: projection radiographs, stored as CR by
# older plate systems and DX by flat panels.
_SAME_KIND = {"CR": "DX"}
# Body Part Examined is free text in practice; chest archives use these for CHEST.
_SAME_BODY_PART = {"THORAX": "CHEST", "TORAX": "CHEST", "LUNG": "CHEST", "LUNGS": "CHEST"}
_SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame children .1 to .4
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"}


def scope_verdict(header: Mapping[str, str] | None, profile: Mapping[str, Any] | None) -> str:
    """``yes``, ``no: <reasons>`` or ``unknown: <why>`` for one file (see the module docstring).
    ``header`` is None for a file without a DICOM header."""
    if profile is None:
        return NO_PROFILE
    trained = profile["header"]
    if header is None:
        return NO_HEADER if profile.get("dicom_images") else IN_SCOPE
    reasons = [
        reason
        for reason in (
            _modality(header["Modality"], trained["Modality"]),
            _body_part(header["BodyPartExamined"], trained["BodyPartExamined"]),
            _secondary_capture(header["SOPClassUID"], trained["SOPClassUID"]),
            _localizer(header["ImageType"], trained["ImageType"]),
            _colour(header["PhotometricInterpretation"], trained["PhotometricInterpretation"]),
        )
        if reason
    ]
    return f"no: {'; '.join(reasons)}" if reasons else IN_SCOPE


def _trained_on(seen: Mapping[str, int]) -> str:
    return ", ".join(sorted(seen))


def _modality(value: str, seen: Mapping[str, int]) -> str:
    return _unseen("modality", value, seen, _SAME_KIND)


def _body_part(value: str, seen: Mapping[str, int]) -> str:
    return _unseen("body part", value, seen, _SAME_BODY_PART)


def _unseen(name: str, value: str, seen: Mapping[str, int], same: Mapping[str, str]) -> str:
    """The reason when ``value`` (or an equivalent) is not among the training values."""
    if not value or not seen or same.get(value, value) in {same.get(s, s) for s in seen}:
        return ""
    return f"{name} {value} (trained on {_trained_on(seen)})"


def _is_secondary_capture(sop_class: str) -> bool:
    return sop_class == _SECONDARY_CAPTURE or sop_class.startswith(_SECONDARY_CAPTURE + ".")


def _secondary_capture(value: str, seen: Mapping[str, int]) -> str:
    if not _is_secondary_capture(value) or any(_is_secondary_capture(s) for s in seen):
        return ""
    return "secondary capture (a screenshot or a scanned image, not an acquisition)"


def _localizer(value: str, seen: Mapping[str, int]) -> str:
    if "LOCALIZER" not in value.split("\\") or any("LOCALIZER" in s.split("\\") for s in seen):
        return ""
    return "localizer (scout) image"


def _colour(value: str, seen: Mapping[str, int]) -> str:
    if value not in _COLOUR or not seen or any(s in _COLOUR for s in seen):
        return ""
    return f"colour image ({value}), trained on greyscale"


def percentiles(scores: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Each score's percentile among the (sorted) validation ``reference`` scores: the share,
    in percent, of validation images that lie closer to the training features."""
    if len(reference) == 0:
        return np.full(len(scores), np.nan)
    return 100.0 * np.searchsorted(reference, scores, side="right") / len(reference)
