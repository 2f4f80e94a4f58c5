"""The table a folder run writes: one row per file, safe to open, resumable, one writer at a time.

``score`` and ``inspect`` write through ``CsvOutput`` (or ``ParquetOutput``). Three promises:

- **Atomic and resumable.** Rows are appended (and flushed) to ``<out>.partial`` as they come, so
  a killed run loses at most the rows not yet written; ``resume=True`` keeps the longest valid
  prefix of an earlier run; the finished table replaces ``out`` atomically, so readers never see
  half a table.
- **One writer.** An exclusive lock on ``<out>.lock`` makes a second run on the same output stop
  at once with a clear message, instead of both truncating each other's rows while each reports
  success.
- **Safe cells.** Every cell is valid UTF-8 and none is a spreadsheet formula (see ``safe_cell``).
"""

from __future__ import annotations

import csv
import fcntl
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from medtransfer import atomic
from medtransfer.folder_pool import FolderError

__all__ = [
    "CsvOutput",
    "OutputBusyError",
    "OutputLock",
    "ParquetOutput",
    "display_path",
    "safe_cell",
    "valid_utf8",
]

CSV_FILE: dict[str, Any] = {"encoding": "utf-8", "newline": ""}
# OWASP's CSV-injection rule: a cell starting with one of these is run as a formula by Excel,
# LibreOffice and Google Sheets. "'" is included so that the escape itself stays reversible.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
_SURROGATE = re.compile(r"[\udc80-\udcff]")


class OutputBusyError(FolderError):
    """Another run holds the output's lock; the CLI reports it in one line (exit 2)."""


# --- cells ----------------------------------------------------------------------------------------


def display_path(rel: str) -> str:
    """A crawled path as a table cell: valid UTF-8, reversible, and unique per file.

    File names are bytes on Linux; a name that is not UTF-8 reaches Python with its stray bytes
    as surrogates, which no UTF-8 reader (pandas, Parquet) accepts. Such bytes are written as
    ``\\xNN``; so that no other name can look the same, a literal backslash in any name is
    written as ``\\\\`` (names without backslashes or stray bytes are unchanged).
    """
    if "\\" not in rel and not _SURROGATE.search(rel):
        return rel
    escaped = rel.replace("\\", "\\\\")
    return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", escaped)


def safe_cell(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would run it as a formula.

    Plain numbers (``-600``, ``+1.5``) are left as they are: window centres are often negative
    and a number is never a formula. The escape is reversible: strip one leading ``'`` from a
    cell whose second character is one of ``= + - @ ' tab CR``.
    """
    if text.startswith(_FORMULA_STARTS) and not _is_number(text):
        return "'" + text
    return text


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def valid_utf8(text: str) -> str:
    """``text`` with the stray bytes of a non-UTF-8 file name (surrogates) as ``?``."""
    return _SURROGATE.sub("?", text)


def _safe_row(row: list[str]) -> list[str]:
    return [safe_cell(display_path(row[0])), *(safe_cell(valid_utf8(c)) for c in row[1:])]


# --- the lock -------------------------------------------------------------------------------------


class OutputLock:
    """An exclusive ``flock`` on ``<out>.lock``, removed when released.

    Removing the file on release means a waiting run could lock a file that is no longer the
    one at that path; it checks, after locking, that its descriptor is still the file at the
    path and otherwise tries again. The kernel drops the lock if the process dies, so a killed
    run never blocks the next one; a stale lock file left behind is harmless.
    """

    def __init__(self, out: Path) -> None:
        self.path = out.with_name(out.name + ".lock")
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(
                    f"another run is writing {out} (lock {self.path} is held); wait for it to "
                    "finish or write to another output"
                ) from None
            if _is_same_file(fd, self.path):
                self._fd: int | None = fd
                return
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# --- the table ------------------------------------------------------------------------------------


def _csv_records(path: Path) -> list[list[str]]:
    """A CSV file's records, without a torn last line (a run killed mid-write)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as handle:
        text = handle.read()
    records = list(csv.reader(io.StringIO(text)))
    return records if text.endswith("\r\n") else records[:-1]


class CsvOutput:
    """``out`` written through ``<out>.partial`` under ``<out>.lock`` (see the module docstring).

    Rows are given with the crawled path in their first cell; they are written as safe cells.
    With ``resume=True`` the rows of an earlier run (its partial file, else its finished output)
    are kept up to the first torn or invalid one (``row_is_valid`` judges a row of the right
    length): ``pending`` then skips their files, and ``kept_rows`` holds those still present.
    Raises OutputBusyError while another run writes the same output.
    """

    def __init__(
        self,
        out: Path,
        columns: list[str],
        *,
        resume: bool,
        row_is_valid: Callable[[list[str]], bool],
    ) -> None:
        self.out, self.columns, self._valid = out, columns, row_is_valid
        self.partial = out.with_name(out.name + ".partial")
        self._lock = OutputLock(out)
        try:
            previous = self._read_previous() if resume else []
            with atomic.replace_on_success(self.partial, "w", **CSV_FILE) as handle:
                csv.writer(handle).writerows([columns, *previous])
        except BaseException:
            self._lock.release()
            raise
        self._previous = {row[0]: row for row in previous}
        self.kept_rows: list[list[str]] = []
        self._sink: io.TextIOBase | None = None

    def pending(self, paths: Iterable[str]) -> Iterator[str]:
        """The paths that still need a row; rows kept for the others go to ``kept_rows``."""
        for path in paths:
            kept = self._previous.get(safe_cell(display_path(path)))
            if kept is not None:
                self.kept_rows.append(kept)
            else:
                yield path

    def __enter__(self) -> CsvOutput:
        self._sink = open(self.partial, "a", **CSV_FILE)  # closed in __exit__
        self._writer = csv.writer(self._sink)
        return self

    def write(self, rows: list[list[str]]) -> None:
        self._writer.writerows(_safe_row(row) for row in rows)
        self._sink.flush()

    def __exit__(self, *exc_info: Any) -> None:
        try:
            self._sink.close()
            if exc_info[0] is None:
                kept = {row[0] for row in self.kept_rows}
                self._finalise(stale=self._previous.keys() - kept)
        finally:
            self._lock.release()

    def _finalise(self, stale: set[str]) -> None:
        """Publish the partial file as the output, without rows for files that have since gone."""
        with (
            open(self.partial, **CSV_FILE) as source,
            atomic.replace_on_success(self.out, "w", **CSV_FILE) as target,
        ):
            writer = csv.writer(target)
            writer.writerows(row for row in csv.reader(source) if row[0] not in stale)
        self.partial.unlink()

    def _read_previous(self) -> list[list[str]]:
        """Rows of an interrupted (partial) or finished (out) earlier run; partial is newer."""
        if self.partial.exists():
            source, records = self.partial, _csv_records(self.partial)
        elif self.out.exists():
            source, records = self.out, self._finished_records()
        else:
            return []
        if not records:
            return []
        if records[0] != self.columns:
            raise FolderError(
                f"cannot resume from {source}: it has columns {records[0]}, this run needs "
                f"{self.columns}; write to a new output or run without resume"
            )
        return self._valid_prefix(records[1:])

    def _finished_records(self) -> list[list[str]]:
        """The header and rows of a finished output, as text."""
        return _csv_records(self.out)

    def _valid_prefix(self, records: list[list[str]]) -> list[list[str]]:
        """Keep rows up to the first one that is torn or malformed: dropping a good row only costs
        a rerun of its file, keeping a bad one would put a wrong value in the output."""
        kept: list[list[str]] = []
        seen: set[str] = set()
        for row in records:
            if len(row) != len(self.columns) or row[0] in seen or not self._valid(row):
                break
            seen.add(row[0])
            kept.append(row)
        return kept


class ParquetOutput(CsvOutput):
    """As ``CsvOutput``, but the finished table is Parquet, with ``float_columns`` as float32
    (empty cells become nulls). The partial file stays CSV: appendable row by row and readable
    after a kill. Needs pyarrow (``pip install medtransfer[parquet]``).
    """

    def __init__(self, out: Path, columns: list[str], *, float_columns: Iterable[str], **kw: Any):
        self.float_columns = [c for c in columns if c in set(float_columns)]
        super().__init__(out, columns, **kw)

    def _finalise(self, stale: set[str]) -> None:
        import pandas as pd

        table = pd.read_csv(self.partial, dtype=str, keep_default_na=False)
        table = table[~table[self.columns[0]].isin(stale)]
        for column in self.float_columns:
            table[column] = pd.to_numeric(table[column].replace("", None)).astype("float32")
        with atomic.replace_on_success(self.out, "wb") as handle:
            table.to_parquet(handle, index=False)
        self.partial.unlink()

    def _finished_records(self) -> list[list[str]]:
        import numpy as np
        import pandas as pd

        table = pd.read_parquet(self.out)
        for column in self.float_columns:  # back to the shortest text of the same float32
            table[column] = [
                "" if np.isnan(v) else np.format_float_positional(v, unique=True, trim="-")
                for v in table[column].to_numpy(np.float32)
            ]
        return [list(table.columns), *table.astype(str).to_numpy().tolist()]
