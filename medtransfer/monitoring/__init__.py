"""Drift monitoring: do the images a deployed model scores still resemble those it was validated
on?

A model's validated accuracy holds for images like its validation images. A new scanner, a
changed protocol or another referral pattern can move the images away from those without any
error appearing: the model still answers. ``monitor`` compares a series of score tables
(``medtransfer score`` output, one per batch, in time order) with the reference the model
carries (its training profile and its validation images' OOD scores and probabilities), and
writes findings, alarms and a report a clinical analyst can read.

Nothing here loads a model or imports TensorFlow: it reads tables and JSON, so it can run where
the reports are made rather than where the model runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medtransfer.monitoring.batches import Batch, read_batches
from medtransfer.monitoring.checks import MonitorThresholds, check_batch, findings_table
from medtransfer.monitoring.reference import (
    INTENSITY_SAMPLES,
    MonitorError,
    MonitorReference,
    load_reference,
)
from medtransfer.monitoring.report import MONITOR_HTML, write_outputs

__all__ = [
    "MonitorError",
    "MonitorReference",
    "MonitorResult",
    "MonitorThresholds",
    "load_reference",
    "monitor",
]

DEFAULT_THRESHOLDS = MonitorThresholds()


@dataclass(frozen=True, eq=False)
class MonitorResult:
    """What a monitor found; ``exit_code`` is 1 when anything alarmed, for schedulers."""

    out_dir: Path
    alarms: list[str]
    findings: pd.DataFrame
    batches: list[str] = field(default_factory=list)  # the labels, in the order given
    files: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.alarms else 0

    def __str__(self) -> str:
        flagged = list(dict.fromkeys(alarm.split(": ", 1)[0] for alarm in self.alarms))
        found = (
            f"{len(self.alarms)} alarm(s) in {len(flagged)} batch(es): {', '.join(flagged)}"
            if self.alarms
            else "no drift"
        )
        return (
            f"Monitored {len(self.batches)} batch(es), {self.files} files: {found}.\n"
            f"Report: {self.out_dir / MONITOR_HTML}"
        )


def monitor(
    score_files: Sequence[str | Path],
    model: str | Path,
    out_dir: str | Path,
    thresholds: MonitorThresholds = DEFAULT_THRESHOLDS,
) -> MonitorResult:
    """Check each score table (a batch, in the order given) against ``model``'s reference (a
    run directory or an export) and write the findings and the report into ``out_dir``."""
    if isinstance(score_files, str | Path):  # one table given bare, not its characters
        score_files = [score_files]
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MonitorError(f"{out} is a file: monitor writes a folder of outputs")
    reference = load_reference(model)
    batches = read_batches(list(score_files), reference.classes)
    found = [finding for batch in batches for finding in check_batch(batch, reference, thresholds)]
    alarms = [finding.alarm_line() for finding in found if finding.alarm]
    findings = findings_table(found)
    record = _record(str(model), reference, batches, thresholds, findings, alarms)
    write_outputs(out, record, findings, batches, reference, thresholds)
    files = sum(len(batch.table) for batch in batches)
    return MonitorResult(out, alarms, findings, [batch.label for batch in batches], files)


def _reference_summary(reference: MonitorReference) -> dict:
    """What the model's reference holds (sizes only), so a reader knows what could be checked."""
    profile = reference.profile or {}
    samples = [reference.intensity_samples(column) for column in INTENSITY_SAMPLES]
    probabilities = reference.validation_probabilities
    return {
        "kind": reference.kind,
        "classes": reference.classes,
        "reported_classes": reference.reported_classes(),
        "profile_version": profile.get("version"),
        "dicom_images": int(profile.get("dicom_images") or 0),
        "intensity_samples": max((len(s) for s in samples if s is not None), default=0),
        "validation_scores": 0 if reference.validation_scores is None
        else len(reference.validation_scores),
        "validation_probabilities": 0 if probabilities is None else len(probabilities),
    }  # fmt: skip


def _record(
    model: str,
    reference: MonitorReference,
    batches: list[Batch],
    thresholds: MonitorThresholds,
    findings: pd.DataFrame,
    alarms: list[str],
) -> dict:
    """``monitor.json``: everything the page shows, for a dashboard or a scheduler."""
    return {
        "model": model,
        "reference": _reference_summary(reference),
        "thresholds": dataclasses.asdict(thresholds),
        "batches": [{"label": batch.label, **batch.counts()} for batch in batches],
        "findings": findings.to_dict("records"),
        "alarms": alarms,
        "drift": bool(alarms),
    }
