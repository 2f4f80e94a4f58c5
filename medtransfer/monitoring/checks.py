"""The checks run on each batch: one finding per check, and an alarm where a shift is both large
and more than a batch of that size shows by chance.

- ``errors``: the share of files that could not be scored (information only, never an alarm).
- ``out_of_scope``: the share of files the scope rules (``medtransfer.scope``) refused.
- ``ood_score``, ``intensity_mean``, ``intensity_std``, ``probability:<class>``: continuous
  distributions against the reference's (PSI and two-sample Kolmogorov-Smirnov). OOD scores
  alarm only when they move away from the training images (a batch of training images lies
  nearer than the validation images do: a shift, but not one to worry about).
- ``modality``, ``body_part``: the DICOM header values against the training files' (PSI and
  chi-square). CR and DX count as different values here: a switch of equipment is a shift
  worth seeing even where the scope rules accept both.
- ``prevalence:<class>``: the share of files the model calls ``<class>`` (its highest
  probability) against that share on the validation images (two-proportion z-test).

A check the table or the model cannot support (an older table without intensity columns, a
model without an OOD reference) is kept as a finding with a note saying why, never dropped
silently and never a failure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from medtransfer.monitoring import drift
from medtransfer.monitoring.batches import PROB_PREFIX, Batch
from medtransfer.monitoring.reference import MonitorReference
from medtransfer.scope import percentiles

COLUMNS = ("batch", "check", "n", "value", "reference", "psi", "statistic", "p_value", "alarm",
           "note")  # fmt: skip
HEADER_TAGS = {"modality": "Modality", "body_part": "BodyPartExamined"}
INTENSITY = ("intensity_mean", "intensity_std")
_CLASS_KINDS = ("prevalence", "probability")
# Values closer than this (probabilities and [0, 1] intensities; relative for OOD distances)
# count as equal in the distribution tests (see _continuous).
RESOLUTION = 1e-4
SMALL_REFERENCE = 100  # fewer reference values: PSI is noisy (the KS test still holds)
_OLDER_TABLE = "the table has no {} column (scored by an older medtransfer): not checked"


@dataclass(frozen=True)
class MonitorThresholds:
    """When a finding is an alarm."""

    psi_alarm: float = 0.25  # the conventional "significant shift"
    alpha: float = 0.01  # a shift alarms only when its test also rejects at this level
    max_out_of_scope: float = 0.05  # share of files the scope rules refuse
    max_prevalence_shift: float = 0.10  # absolute difference of a predicted class's share
    min_files: int = 30  # fewer usable files: the check is reported but never alarms


@dataclass(frozen=True)
class Finding:
    """One check on one batch: a row of the findings table (``reason`` is not a column: it
    completes the alarm line)."""

    check: str
    n: int = 0
    value: float = math.nan
    reference: float = math.nan
    psi: float = math.nan
    statistic: float = math.nan
    p_value: float = math.nan
    alarm: bool = False
    note: str = ""
    reason: str = ""
    batch: str = ""

    def alarm_line(self) -> str:
        return f"{self.batch}: {self.check} {self.reason}"

    def row(self) -> dict:
        return {column: getattr(self, column) for column in COLUMNS}


def findings_table(findings: list[Finding]) -> pd.DataFrame:
    """The findings as a table, one row per batch and check (columns ``COLUMNS``)."""
    table = pd.DataFrame([finding.row() for finding in findings], columns=list(COLUMNS))
    return table.astype({"n": int, "alarm": bool})


def format_p(p: float) -> str:
    """A p-value in one significant digit; one too small for a float is said so."""
    return "< 1e-300" if p < 1e-300 else f"{p:.1g}"


def _judged(finding: Finding, shifted: bool, reason: str, t: MonitorThresholds) -> Finding:
    """The finding with its alarm, unless the batch has too few files to judge."""
    if finding.n < t.min_files:
        note = f"too few files ({finding.n} < {t.min_files}): no alarm"
        return replace(finding, note="; ".join(filter(None, [finding.note, note])))
    return replace(finding, alarm=shifted, reason=reason if shifted else "")


def _finite(values: pd.Series | np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]


def check_batch(batch: Batch, reference: MonitorReference, t: MonitorThresholds) -> list[Finding]:
    """Every check on one batch, in a fixed order (one finding each)."""
    found = [_errors(batch), _out_of_scope(batch, t), _ood_score(batch, reference, t)]
    found += [_intensity(batch, reference, column, t) for column in INTENSITY]
    found += [_categorical(batch, reference, column, t) for column in HEADER_TAGS]
    found += _class_checks(batch, reference, t)
    return [replace(finding, batch=batch.label) for finding in found]


def _errors(batch: Batch) -> Finding:
    counts = batch.counts()
    share = counts["error"] / counts["files"] if counts["files"] else math.nan
    return Finding("errors", counts["files"], share, note="information only: never an alarm")


def _out_of_scope(batch: Batch, t: MonitorThresholds) -> Finding:
    """The share refused among files with a verdict (undecodable files have none)."""
    if "in_scope" not in batch.table:
        return Finding("out_of_scope", note=_OLDER_TABLE.format("in_scope"))
    verdicts = batch.table["in_scope"]
    verdicts = verdicts[verdicts != ""]
    if verdicts.empty:
        return Finding("out_of_scope", note="no file has a scope verdict")
    share = float(verdicts.str.startswith("no:").mean())
    unknown = int(verdicts.str.startswith("unknown:").sum())
    note = f"{unknown} of {len(verdicts)} files of unknown scope" if unknown else ""
    finding = Finding("out_of_scope", len(verdicts), share, 0.0, note=note)
    limit = t.max_out_of_scope
    reason = f"{share:.1%} of files out of the model's scope (> {limit:.1%})"
    return _judged(finding, share > limit, reason, t)


def _continuous(
    check: str,
    sample: np.ndarray,
    expected: np.ndarray,
    t: MonitorThresholds,
    resolution: float = RESOLUTION,
    value: float | None = None,
    typical: float | None = None,
) -> Finding:
    """PSI and KS of a continuous sample against the ``expected`` (reference) values; the
    finding's value and reference are the two medians unless ``value``/``typical`` say
    otherwise. Both sides are first rounded to ``resolution``: the same image gives values
    that differ in the seventh digit between Keras in training and the exported graph, and
    a model whose outputs hardly vary would otherwise alarm on that rounding noise."""
    sample, expected = drift.quantised(sample, resolution), drift.quantised(expected, resolution)
    psi = drift.psi(expected, sample)
    statistic, p = drift.ks_test(expected, sample)
    value = float(np.median(sample)) if value is None else value
    typical = float(np.median(expected)) if typical is None else typical
    note = (
        f"the reference holds {len(expected)} images: its deciles, and so the PSI, are rough"
        if len(expected) < SMALL_REFERENCE
        else ""
    )
    finding = Finding(check, len(sample), value, typical, psi, statistic, p, note=note)
    reason = f"drifted (PSI {psi:.2f} >= {t.psi_alarm:g}, KS p {format_p(p)})"
    return _judged(finding, psi >= t.psi_alarm and p < t.alpha, reason, t)


def _ood_score(batch: Batch, reference: MonitorReference, t: MonitorThresholds) -> Finding:
    """Scored files' OOD scores against the validation images'; the value is the batch's
    median percentile among the validation scores (50 for a batch like validation)."""
    if "ood_score" not in batch.table:
        return Finding("ood_score", note=_OLDER_TABLE.format("ood_score"))
    validation = reference.validation_scores
    if validation is None:
        return Finding("ood_score", note="the model has no OOD reference: not checked")
    scores = _finite(batch.ok["ood_score"])
    if not len(scores):
        return Finding("ood_score", note="no scored file has an OOD score")
    median = float(np.median(percentiles(scores, validation)))
    resolution = RESOLUTION * max(float(np.median(validation)), 1e-12)  # distances have a scale
    finding = _continuous("ood_score", scores, validation, t, resolution, median, 50.0)
    if finding.alarm and median <= 50.0:  # images nearer the training images than validation's
        note = "closer to the training images than the validation images are: not an alarm"
        return replace(finding, alarm=False, reason="", note=note)
    return finding


def _intensity(
    batch: Batch, reference: MonitorReference, column: str, t: MonitorThresholds
) -> Finding:
    """Every decoded file's value (scored or refused: the pixels are the same either way)."""
    if column not in batch.table:
        return Finding(column, note=_OLDER_TABLE.format(column))
    trained = reference.intensity_samples(column)
    if trained is None:
        note = "the model's training profile has no intensity samples (an older model)"
        return Finding(column, note=f"{note}: not checked")
    values = _finite(batch.table[column])
    if not len(values):
        return Finding(column, note="no file in the batch was decoded")
    return _continuous(column, values, trained, t)


def _categorical(
    batch: Batch, reference: MonitorReference, column: str, t: MonitorThresholds
) -> Finding:
    """Header values against the training files'; the value is the share of files with a value
    no training file had."""
    if column not in batch.table:
        return Finding(column, note=_OLDER_TABLE.format(column))
    trained = reference.header_counts(HEADER_TAGS[column])
    if trained is None:
        return Finding(column, note=f"no training DICOM file recorded a {column}: not checked")
    values = batch.table[column]
    values = values[values != ""]
    if values.empty:
        return Finding(column, note=f"no file in the batch has a {column} (not DICOM?)")
    counts = {str(k): int(v) for k, v in values.value_counts().items()}
    psi = drift.categorical_psi(trained, counts)
    statistic, p = drift.chi_square_test(trained, counts)
    unseen = float((~values.isin(list(trained))).mean())
    finding = Finding(column, len(values), unseen, 0.0, psi, statistic, p)
    reason = f"drifted (PSI {psi:.2f} >= {t.psi_alarm:g}, chi-square p {format_p(p)})"
    return _judged(finding, psi >= t.psi_alarm and p < t.alpha, reason, t)


def _class_checks(batch: Batch, reference: MonitorReference, t: MonitorThresholds) -> list[Finding]:
    """Prevalence and probability distribution of each reported class, on scored files."""
    shown = reference.reported_classes()
    validation = reference.validation_probabilities
    if validation is None:
        note = "the model records no validation probabilities (an older model): not checked"
        return [Finding(f"{kind}:{name}", note=note) for name in shown for kind in _CLASS_KINDS]
    columns = [f"{PROB_PREFIX}{name}" for name in reference.classes]
    probs = batch.ok[columns].to_numpy(np.float64)
    probs = probs[np.isfinite(probs).all(axis=1)]
    found = []
    for name in shown:
        k = reference.classes.index(name)
        if not len(probs):
            note = "no scored file has probabilities"
            found += [Finding(f"{kind}:{name}", note=note) for kind in _CLASS_KINDS]
            continue
        found.append(_prevalence(name, k, probs, validation, t))
        found.append(_continuous(f"probability:{name}", probs[:, k], validation[:, k], t))
    return found


def _prevalence(
    name: str, k: int, probs: np.ndarray, validation: np.ndarray, t: MonitorThresholds
) -> Finding:
    hits = int((probs.argmax(axis=1) == k).sum())
    validation_hits = int((validation.argmax(axis=1) == k).sum())
    z, p = drift.two_proportion_test(hits, len(probs), validation_hits, len(validation))
    share, expected = hits / len(probs), validation_hits / len(validation)
    finding = Finding(f"prevalence:{name}", len(probs), share, expected, statistic=z, p_value=p)
    shifted = abs(share - expected) > t.max_prevalence_shift and p < t.alpha
    reason = (
        f"shifted ({share:.1%} of files called {name}, {expected:.1%} on validation; "
        f"difference > {t.max_prevalence_shift:.1%}, p {format_p(p)})"
    )
    return _judged(finding, shifted, reason, t)
