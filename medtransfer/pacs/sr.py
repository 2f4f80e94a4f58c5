"""One DICOM Comprehensive 3D SR per scored instance: a TID 1500 measurement report (highdicom).

What a PACS viewer shows for an image the model scored:

- the algorithm: the model card's name and the export's version (TID 4019 Algorithm Name and
  Version, on every measurement group);
- one measurement group (TID 1501) per class: finding type = the class, coded in the private
  scheme ``99MEDTRANSFER`` (a model's classes have no standard code), measurement DCM 122157
  "Probability" in UCUM ``1`` ("no units"), the image scored as the group's source image
  (SOP Class and Instance UIDs);
- for each class the export has a threshold for, the decision at that operating point as a
  qualitative evaluation: the class concept = SCT 52101004 "Present" or SCT 272519000 "Absent";
- procedure reported SCT 363679005 "Imaging", observer: a device named after the algorithm.

Patient and study data: the SR copies the patient and study attributes highdicom needs from the
source and nothing else (no institution, equipment or other patient module attributes). An
attribute the source lacks is not invented: the SR IOD requires the Type 2 ones (birth date,
sex, ...) to be present, so they are present and empty. UIDs are derived from the source's SOP
Instance UID and the algorithm, so re-scoring the same image with the same model writes (and
stores) the same SR instance instead of a duplicate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from medtransfer import atomic
from medtransfer.export_layout import EXPORT_INFO, MODEL_CARD, is_export
from medtransfer.rundir import THRESHOLDS_FILE
from medtransfer.scoring import ScoringError

__all__ = [
    "CLASS_SCHEME",
    "Algorithm",
    "Decision",
    "algorithm_of",
    "build_report",
    "report_name",
    "write_report",
]

CLASS_SCHEME = "99MEDTRANSFER"  # private coding scheme of the model's class names
SR_SERIES_NUMBER = 9001
# Copied from the source when present, else left empty (the Type 2 ones highdicom reads).
_COPIED = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID",
           "SeriesInstanceUID")  # fmt: skip
_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
           "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")  # fmt: skip


@dataclass(frozen=True)
class Algorithm:
    """The algorithm as the SR names it: the model card's name, the export's version."""

    name: str
    version: str


@dataclass(frozen=True)
class Decision:
    """A class's threshold at an operating point: probability >= threshold means Present."""

    class_name: str
    point: str
    threshold: float  # +inf: no image is called positive


def algorithm_of(model: str | Path, point: str = "youden") -> tuple[Algorithm, list[Decision]]:
    """An export's algorithm (model card name, version folder) and its thresholds at ``point``
    (none when the run was exported without evaluation). A run directory has no model card:
    SRs need an export, so a report always names a released model."""
    folder = Path(model)
    if not is_export(folder) or not (folder / MODEL_CARD).is_file():
        raise ScoringError(
            f"--sr and --stow need an exported model (its model card names the algorithm in "
            f"the report); {model} is not one: run medtransfer export first"
        )
    card = json.loads((folder / MODEL_CARD).read_text(encoding="utf-8"))
    algorithm = Algorithm(str(card["model"]), folder.resolve().name)
    path = folder / EXPORT_INFO.parent / THRESHOLDS_FILE
    if not path.is_file():
        return algorithm, []
    record = json.loads(path.read_text(encoding="utf-8"))
    decisions = []
    for name, points in record.get("thresholds", {}).items():
        if point in points:
            threshold = math.inf if points[point] is None else float(points[point])
            decisions.append(Decision(name, point, threshold))
    known = sorted({p for points in record.get("thresholds", {}).values() for p in points})
    if known and not decisions:  # a mistyped name would otherwise drop every decision
        raise ScoringError(
            f"--operating-point {point!r} is not one of the export's thresholds: {known}"
        )
    return algorithm, decisions


def report_name(source_sop_instance_uid: str) -> str:
    """The SR's file name in ``--sr DIR``: one per source instance."""
    return f"{source_sop_instance_uid}.dcm"


def build_report(
    source: Dataset,
    class_names: Sequence[str],
    probabilities: Sequence[float],
    algorithm: Algorithm,
    decisions: Sequence[Decision] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR for one scored image (``source``: its header; pixels are not needed)."""
    evidence = _evidence(source)
    sop = str(source.SOPInstanceUID)
    image = hd.sr.SourceImageForMeasurementGroup(str(source.SOPClassUID), sop)
    thresholds = {d.class_name: d.threshold for d in decisions}
    groups = [
        _group(sop, name, k, float(p), image, algorithm, thresholds.get(name))
        for k, (name, p) in enumerate(zip(class_names, probabilities, strict=True))
    ]
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid("device", algorithm.name, algorithm.version), name=algorithm.name[:64]
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(codes.DCM.Device, device)
    )
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=codes.SCT.Imaging,
        imaging_measurements=groups,
        title=codes.DCM.ImagingMeasurementReport,
    )
    study = str(source.StudyInstanceUID)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[evidence],
        content=report,
        series_instance_uid=_uid("series", study, algorithm.name, algorithm.version),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=_uid("sr", sop, algorithm.name, algorithm.version),
        instance_number=1,
        manufacturer="medtransfer",
        manufacturer_model_name=algorithm.name[:64],
        software_versions=algorithm.version[:64],
        series_description=f"{algorithm.name} {algorithm.version}"[:64],
        is_complete=True,
    )
    sr.preamble = b"\0" * 128  # STOW-RS (dicomweb-client) writes a preamble only if set
    return sr


def _group(
    sop: str,
    name: str,
    index: int,
    probability: float,
    image: hd.sr.SourceImageForMeasurementGroup,
    algorithm: Algorithm,
    threshold: float | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One class's group: its probability and, with a threshold, the decision."""
    concept = class_concept(name, index)
    algorithm_id = hd.sr.AlgorithmIdentification(algorithm.name[:64], algorithm.version[:64])
    probability_item = hd.sr.Measurement(
        name=codes.DCM.Probability, value=probability, unit=codes.UCUM.NoUnits
    )
    evaluations = []
    if threshold is not None:
        present = probability >= threshold
        value = codes.SCT.Present if present else codes.SCT.Absent
        evaluations.append(hd.sr.QualitativeEvaluation(concept, value))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=_uid("tracking", sop, name), identifier=f"{name}"[:64]
        ),
        finding_type=concept,
        algorithm_id=algorithm_id,
        measurements=[probability_item],
        qualitative_evaluations=evaluations,
        source_images=[image],
    )


def class_concept(name: str, index: int) -> hd.sr.CodedConcept:
    """A class as a code of the private scheme: its name as the code value when that fits
    (16 characters), else ``CLASS<index>``; the name itself as the meaning."""
    value = name if len(name) <= 16 and name.isascii() and name.strip() == name else f"CLASS{index}"
    return hd.sr.CodedConcept(value, CLASS_SCHEME, name[:64])


def _evidence(source: Dataset) -> Dataset:
    """What highdicom reads of the source, and only that: it copies the patient and study
    modules from its evidence, so handing it the whole source would copy every attribute
    of those modules the source has (other IDs, age, weight, comments)."""
    evidence = Dataset()
    for keyword in _COPIED:
        if keyword in source:
            evidence[keyword] = source[keyword]
    for keyword in _TYPE_2:
        if keyword in source:
            evidence[keyword] = source[keyword]
        else:
            setattr(evidence, keyword, None)
    return evidence


def write_report(sr: Dataset, folder: Path, source_sop_instance_uid: str) -> Path:
    """Write ``sr`` into ``folder`` atomically (a killed run never leaves half a file)."""
    path = folder / report_name(source_sop_instance_uid)
    with atomic.replace_on_success(path, "wb") as handle:
        sr.save_as(handle, enforce_file_format=True)
    return path


def _uid(*parts: str) -> str:
    """A UID derived from ``parts``: the same report gets the same UID every time."""
    return str(generate_uid(entropy_srcs=["medtransfer.pacs.sr", *parts]))
