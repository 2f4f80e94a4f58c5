"""The thresholds record: operating points chosen on validation, as files store them.

Evaluation writes it (in the report and, for a run, in the run's ``evaluation/``); export
ships it beside the graph. In memory a threshold may be +inf (no image called positive);
JSON has no infinity, so it is written as null with a note saying what it stands for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medtransfer import atomic
from medtransfer.errors import RunError
from medtransfer.evaluation.clinical import threshold_note


def thresholds_for_json(record: dict) -> dict:
    """The thresholds record as written: JSON has no infinity, so a +inf threshold is written
    as null, with a note in ``threshold_notes[class][point]`` saying what it stands for."""
    notes = {}
    for name, points in record["thresholds"].items():
        noted = {p: note for p, t in points.items() if (note := threshold_note(p, t))}
        if noted:
            notes[name] = noted
    return {**record, "threshold_notes": notes}


def write_thresholds(path: str | Path, record: dict) -> None:
    """Write a thresholds record (in-memory thresholds may be +inf) as strict JSON."""
    atomic.write_json(path, thresholds_for_json(record))


def read_thresholds(path: str | Path) -> dict | None:
    """A thresholds file (None if there is none) with each null threshold back to +inf, the
    decision it stands for (no image called positive); older files' ``Infinity`` reads too."""
    file = Path(path)
    if not file.is_file():
        return None
    try:
        record = json.loads(file.read_text())
        record.pop("threshold_notes", None)  # derived from the thresholds: rewritten with them
        record["thresholds"] = {
            name: {point: atomic.float_or(t, math.inf) for point, t in points.items()}
            for name, points in record["thresholds"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # truncated or edited
        raise RunError(
            f"{file} is not a thresholds file ({type(exc).__name__}): evaluate the run again"
        ) from None
    return record
