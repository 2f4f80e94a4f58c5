"""Quality check of a folder before training or scoring: which files decode, and what they are.

``inspect_folder`` decodes every file under a folder (really decodes: a file whose header parses
but whose pixels do not is exactly what QA must find) and writes ``qa.csv``, one row per file:
``path``, ``status`` (``ok``, ``error`` or ``skipped``), ``reason`` and the acquisition tags
that are safe to share (never patient tags). ``skipped`` means valid DICOM that holds no image
(DICOMDIR, structured reports, RT plans, waveforms): nothing to decode, nothing wrong.

Crawling, the decode pool, crash recovery, the partial file and resume are the shared folder
engine's (``medtransfer.folder_pool``), the same as ``score``'s, so both commands see the same
files in the same order. Like ``medtransfer.io`` this module never imports TensorFlow: it is
imported by the spawned workers.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from tqdm import tqdm

from medtransfer.folder_output import CsvOutput
from medtransfer.folder_pool import DEFAULT_LIMITS, DecodeLimits, FolderPool, check_paths, crawl
from medtransfer.io import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    UnsupportedDicomError,
    is_dicom,
    load_image,
)

__all__ = ["COLUMNS", "STATUSES", "InspectSummary", "inspect_file", "inspect_folder"]

STATUSES = ("ok", "error", "skipped")
# qa.csv column -> key in ``read_dicom``'s safe metadata (DICOM keyword or pipeline choice).
TAG_COLUMNS: Mapping[str, str] = {
    "modality": "Modality",
    "body_part": "BodyPartExamined",
    "view_position": "ViewPosition",
    "manufacturer": "Manufacturer",
    "model": "ManufacturerModelName",
    "rows": "Rows",
    "columns": "Columns",
    "bits_stored": "BitsStored",
    "photometric_interpretation": "PhotometricInterpretation",
    "transfer_syntax": "TransferSyntaxUID",
    "frames": "NumberOfFrames",
    "window_center": "window_center",
    "window_width": "window_width",
    "window_source": "window_source",
    "sop_class": "SOPClassUID",
}
COLUMNS = ("path", "status", "reason", *TAG_COLUMNS)
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_TOP_REASONS = 5


# --- one file (runs in a worker) ------------------------------------------------------------------


def inspect_file(path: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> list[str]:
    """``[status, reason, *tag cells]`` for one file, after a full decode of its first frame.

    Failures keep the tags the header still gives (rows, transfer syntax...), because "which
    encodings fail" is the question a QA table is read for.
    """
    try:
        image = load_image(path, max_pixels=max_pixels)
    except UnsupportedDicomError as exc:
        header = _read_header(path)
        # Unsupported covers both "no image at all" (skipped) and an image this build cannot
        # decode, e.g. an unknown transfer syntax (an error: the image is lost to training).
        status = "error" if header is None or _has_pixels(header) else "skipped"
        return [status, str(exc), *_tag_cells(_header_meta(header))]
    except ImageReadError as exc:
        return ["error", str(exc), *_tag_cells(_header_meta(_read_header(path)))]
    return ["ok", "", *_tag_cells(image.meta)]


def _read_header(path: str) -> Dataset | None:
    """The data set without loading large values (pixels), or None when it is not DICOM."""
    if not is_dicom(path):
        return None
    try:
        return pydicom.dcmread(path, force=True, defer_size="64 KB")
    except Exception:
        return None


def _has_pixels(ds: Dataset) -> bool:
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def _header_meta(ds: Dataset | None) -> dict[str, Any]:
    """The safe tags of a file that did not decode, keyed like ``read_dicom``'s metadata."""
    if ds is None:
        return {}
    meta = {key: _get(ds, key) for key in TAG_COLUMNS.values()}
    meta["SOPClassUID"] = meta["SOPClassUID"] or _get(ds.file_meta, "MediaStorageSOPClassUID")
    meta["TransferSyntaxUID"] = _get(ds.file_meta, "TransferSyntaxUID")
    if meta["NumberOfFrames"] is None and meta["Rows"] is not None:
        meta["NumberOfFrames"] = 1  # as read_dicom counts a single-frame image
    return meta


def _get(ds: Dataset, keyword: str) -> Any:
    # A malformed value raises on access; one bad tag must not cost the row its other tags.
    try:
        return ds.get(keyword)
    except Exception:
        return None


def _tag_cells(meta: Mapping[str, Any]) -> list[str]:
    return [_cell(meta.get(key)) for key in TAG_COLUMNS.values()]


def _cell(value: Any) -> str:
    """One-line CSV text: numbers in their shortest exact form, multi-values joined by '\\'."""
    if value is None:
        return ""
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(_cell(v) for v in value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    return " ".join(str(value).split())


# --- the folder -----------------------------------------------------------------------------------


@dataclass
class InspectSummary:
    """What ``qa.csv`` holds (resumed rows included), for the end-of-run report and exit code."""

    out_csv: str
    by_status: Counter[str] = field(default_factory=Counter)
    by_modality: Counter[str] = field(default_factory=Counter)
    by_transfer_syntax: Counter[str] = field(default_factory=Counter)
    error_reasons: Counter[str] = field(default_factory=Counter)
    n_resumed: int = 0
    seconds: float = 0.0

    @property
    def n_files(self) -> int:
        return self.by_status.total()

    @property
    def files_per_second(self) -> float:
        inspected = self.n_files - self.n_resumed
        return inspected / self.seconds if self.seconds else 0.0

    @property
    def exit_code(self) -> int:
        """CLI contract: 0 when every file decoded or was skipped, 1 when some are errors."""
        return 1 if self.by_status["error"] else 0

    def add(self, row: list[str]) -> None:
        cells = dict(zip(COLUMNS, row, strict=True))
        self.by_status[cells["status"]] += 1
        self.by_modality[cells["modality"] or "-"] += 1
        self.by_transfer_syntax[_syntax_name(cells["transfer_syntax"])] += 1
        if cells["status"] == "error":
            self.error_reasons[cells["reason"]] += 1

    def __str__(self) -> str:
        resumed = f", {self.n_resumed} kept from a previous run" if self.n_resumed else ""
        counts = ", ".join(f"{self.by_status[s]} {s}" for s in STATUSES)
        lines = [
            f"{self.n_files} files{resumed}: {counts}. Inspected "
            f"{self.n_files - self.n_resumed} in {self.seconds:.1f} s "
            f"({self.files_per_second:.1f} files/s). Wrote {self.out_csv}.",
            f"  by modality: {_counts(self.by_modality)}",
            f"  by transfer syntax: {_counts(self.by_transfer_syntax)}",
        ]
        if self.error_reasons:
            lines.append("  top error reasons:")
            lines += [f"    {n:4d}  {r}" for r, n in self.error_reasons.most_common(_TOP_REASONS)]
        return "\n".join(lines)


def _syntax_name(uid: str) -> str:
    return UID(uid).name if uid else "-"


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n}" for name, n in counter.most_common())


def inspect_folder(
    input_dir: str | os.PathLike,
    out_csv: str | os.PathLike,
    *,
    workers: int = 2,
    resume: bool = False,
    progress: bool = True,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> InspectSummary:
    """Decode every file under ``input_dir`` and write ``qa.csv`` (one row per file) atomically.

    A bad file is an error row, never a stopped run. ``workers=0`` decodes in this process.
    ``resume=True`` keeps the rows of an interrupted (or finished) run and inspects the rest.
    ``limits`` bounds what one file may cost, as for ``score``.
    Raises FolderError (a MedtransferError) for a missing folder, an output inside the input
    folder, a negative ``workers`` or an output another run is writing.
    """
    start = time.monotonic()
    root, out = check_paths(input_dir, out_csv)
    pool = FolderPool(root, inspect_file, (limits.max_pixels,), workers=workers, limits=limits)
    output = CsvOutput(out, list(COLUMNS), resume=resume, row_is_valid=_row_is_valid)
    summary = InspectSummary(out_csv=str(out))
    with (
        output,
        pool,
        tqdm(desc="inspecting", unit=" files", disable=not progress, dynamic_ncols=True) as bar,
    ):
        # Results are a few short strings, so a deep window costs nothing and hides slow files.
        for outcome in pool.imap(output.pending(crawl(root)), max_in_flight=8 * max(workers, 1)):
            row = [outcome.path, *(outcome.value or _engine_error(outcome.error))]
            output.write([row])
            summary.add(row)
            bar.update()
            bar.set_postfix(errors=summary.by_status["error"], refresh=False)
    summary.seconds = time.monotonic() - start
    _add_kept(summary, output.kept_rows)
    return summary


def _engine_error(message: str) -> list[str]:
    """Row cells for a file the engine could not run at all (unreadable, worker died)."""
    return ["error", message, *_tag_cells({})]


def _add_kept(summary: InspectSummary, rows: Iterable[list[str]]) -> None:
    for row in rows:
        summary.add(row)
        summary.n_resumed += 1


def _row_is_valid(row: list[str]) -> bool:
    """A resumed row must be one this module could have written."""
    status, reason = row[1], row[2]
    return status in STATUSES and (status == "ok") == (reason == "")
