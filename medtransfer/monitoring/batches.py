"""Score tables (``medtransfer score`` output, CSV or Parquet) as the batches a monitor follows.

A table is read into the columns the checks use, and no others: the file paths (which may
name patients in their folders), the error messages and the SOP instance UIDs are dropped as
the table is read, so nothing downstream can copy them into a report. Text columns are read as
text and numbers as floats (an empty cell is NaN), whichever format the table came in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.monitoring.reference import MonitorError

REQUIRED = ("path", "status")
TEXT_COLUMNS = ("status", "modality", "body_part", "in_scope")
NUMBER_COLUMNS = ("ood_score", "ood_percentile", "intensity_mean", "intensity_std")
PROB_PREFIX = "prob_"
# folder_output.safe_cell puts a "'" before a cell a spreadsheet would run as a formula
_ESCAPED = ("'=", "'+", "'-", "'@", "'\t", "'\r", "''")


@dataclass(frozen=True, eq=False)
class Batch:
    """One score table: its label in the outputs and its rows (aggregable columns only)."""

    label: str
    table: pd.DataFrame

    @property
    def ok(self) -> pd.DataFrame:
        """The rows the model scored."""
        return self.table[self.table["status"] == "ok"]

    def counts(self) -> dict[str, int | None]:
        """Files, scored, errors, and out of scope (None for a table without scope verdicts)."""
        status = self.table["status"]
        scope = self.table.get("in_scope")
        return {
            "files": len(self.table),
            "ok": int((status == "ok").sum()),
            "error": int((status == "error").sum()),
            "out_of_scope": None if scope is None else int(scope.str.startswith("no:").sum()),
        }


def batch_labels(paths: Sequence[str | Path]) -> list[str]:
    """Each path's shortest trailing part that no other path ends with, so that dated folders
    (``2026-11/scores.csv``) keep their date and plain names (``a.csv``) stay short."""
    parts = [Path(p).resolve().parts for p in paths]
    if len(set(parts)) != len(parts):
        duplicate = next(str(p) for p, q in zip(paths, parts, strict=True) if parts.count(q) > 1)
        raise MonitorError(f"{duplicate} is given more than once: each batch must be its own file")
    return [_label(own, [other for other in parts if other != own]) for own in parts]


def _label(own: tuple[str, ...], others: list[tuple[str, ...]]) -> str:
    for k in range(1, len(own) + 1):
        if all(other[-k:] != own[-k:] for other in others):
            return Path(*own[-k:]).as_posix()
    return Path(*own).as_posix()


def read_batches(paths: Sequence[str | Path], classes: Sequence[str]) -> list[Batch]:
    """The score tables in the order given (the order the batches were scored in)."""
    if not paths:
        raise MonitorError("no score tables given")
    labels = batch_labels(paths)
    return [
        Batch(label, read_scores(path, classes)) for label, path in zip(labels, paths, strict=True)
    ]


def read_scores(path: str | Path, classes: Sequence[str]) -> pd.DataFrame:
    """A score table with text columns as text and number columns as floats, its probability
    columns checked against the model's ``classes``."""
    raw = _read(Path(path))
    missing = [column for column in REQUIRED if column not in raw.columns]
    if missing:
        raise MonitorError(f"{path} is not a score table: it has no {' or '.join(missing)} column")
    probs = [c for c in raw.columns if str(c).startswith(PROB_PREFIX)]
    expected = [f"{PROB_PREFIX}{name}" for name in classes]
    if sorted(probs) != sorted(expected):
        raise MonitorError(
            f"{path} has probability columns {probs or 'none'}, the model's classes need "
            f"{expected}: was it scored by another model?"
        )
    table = pd.DataFrame(index=range(len(raw)))
    for column in [c for c in TEXT_COLUMNS if c in raw.columns]:
        table[column] = _text(raw[column])
    for column in [c for c in (*NUMBER_COLUMNS, *expected) if c in raw.columns]:
        table[column] = _numbers(raw[column])
    return table


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise MonitorError(f"{path} is not a file: no score table there")
    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path).reset_index(drop=True)
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except ImportError:
        raise MonitorError(
            f"{path}: reading Parquet needs pyarrow (medtransfer[parquet])"
        ) from None
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        raise MonitorError(
            f"{path} cannot be read as a score table ({type(exc).__name__})"
        ) from None


def _text(column: pd.Series) -> pd.Series:
    """Text with missing values as "" and spreadsheet escapes undone."""
    text = column.astype(object).where(column.notna(), "").astype(str).reset_index(drop=True)
    escaped = text.str.startswith(_ESCAPED)
    return text.where(~escaped, text.str[1:])


def _numbers(column: pd.Series) -> pd.Series:
    """Floats, with empty or malformed cells as NaN (a number column never fails a read)."""
    values = pd.to_numeric(column.reset_index(drop=True), errors="coerce")
    return values.astype(np.float64)
