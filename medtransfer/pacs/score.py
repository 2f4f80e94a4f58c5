"""``medtransfer score --dicomweb URL``: score a PACS's instances as a folder is scored.

The instances the listing selects (``listing.py``) go through the folder engine
(``scoring.score_files``) as tickets in a staging folder beside the output; decode workers
fetch and decode each (``fetch.py``), so decoding, limits, scope checks, per-instance error
rows, the output lock, ``--resume`` and the atomic table are folder scoring's own. What is
particular to a PACS:

- the ``path`` cell is ``STUDY_UID/SERIES_UID/SOP_UID`` (stable, readable, unique), and
  ``sop_instance_uid`` holds the SOP Instance UID;
- every series found is one row of ``<out stem>.series.csv`` (selected or not, and why);
- with ``--sr DIR`` and/or ``--stow URL`` each ok row gets its structured report (``sr.py``)
  before the row is written, so a row in the table means its report exists: a resumed run
  skips only instances whose reports were made. A report that cannot be made or stored turns
  the row into an error row saying so.
"""

from __future__ import annotations

import csv
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import requests

from medtransfer import atomic
from medtransfer.folder_output import CSV_FILE, safe_cell
from medtransfer.folder_pool import check_paths, describe
from medtransfer.io import ImageReadError
from medtransfer.pacs.client import PacsError, Server, client_for, http_problem
from medtransfer.pacs.fetch import FetchError, fetch_and_decode
from medtransfer.pacs.listing import SERIES_COLUMNS, Instance, SeriesRow, list_instances
from medtransfer.pacs.rules import DEFAULT_RULES, load_rules
from medtransfer.pacs.sr import Algorithm, Decision, build_report, write_report
from medtransfer.scoring import (
    BASE_COLUMNS,
    INTENSITY_COLUMNS,
    SCOPE_COLUMNS,
    FileSource,
    Predictor,
    ScoreOptions,
    ScoreSummary,
    prob_columns,
    score_files,
)

__all__ = ["PacsSummary", "Reports", "score_dicomweb", "series_table"]

STAGING_SUFFIX = ".dicomweb-staging"
_FIRST_PROB = len(BASE_COLUMNS) + len(SCOPE_COLUMNS) + len(INTENSITY_COLUMNS)  # then probs
_OPTIONS = ScoreOptions()


@dataclass(frozen=True)
class Reports:
    """Where each scored instance's SR goes: a folder, a STOW-RS server, or both."""

    algorithm: Algorithm
    decisions: tuple[Decision, ...] = ()
    folder: Path | None = None
    stow: Server | None = None


@dataclass
class PacsSummary:
    """The scores' summary, and what the listing found: ``exit_code`` is the table's."""

    scores: ScoreSummary
    series_table: str
    n_series: int
    n_series_rejected: int

    @property
    def exit_code(self) -> int:
        return self.scores.exit_code

    def __str__(self) -> str:
        return (
            f"{self.n_series} series found, {self.n_series - self.n_series_rejected} with "
            f"instances selected (all listed in {self.series_table}). {self.scores}"
        )


def score_dicomweb(
    server: Server,
    predictor: Predictor,
    out_csv: str | os.PathLike,
    *,
    study: str | None = None,
    query: str | None = None,
    rules: str | Path = DEFAULT_RULES,
    reports: Reports | None = None,
    options: ScoreOptions = _OPTIONS,
) -> PacsSummary:
    """Score the instances of ``study`` and/or the series ``query`` finds on ``server`` into
    ``out_csv`` (the ``scores.csv`` columns), selected by the series ``rules``. Raises
    PacsError (exit 2) when the server cannot be listed or nothing is found; an instance
    that cannot be fetched or decoded is an error row (exit 1)."""
    if not study and not query:
        raise PacsError("--dicomweb needs --study UID or --query (a whole PACS is not scored)")
    prob_columns(predictor.class_names)  # checked before anything is fetched
    selections = load_rules(rules)
    out = Path(out_csv).resolve()
    staging = out.with_name(out.name + STAGING_SUFFIX)
    staging.mkdir(parents=True, exist_ok=True)
    root, out = check_paths(staging, out)
    instances, series = list_instances(server, selections, study, query)
    if reports is not None and reports.folder is not None:
        reports.folder.mkdir(parents=True, exist_ok=True)
    source = FileSource(
        root,
        _tickets(Path(root), instances),
        local=False,
        decode=fetch_and_decode,
        extra=(server,),
        expected=(ImageReadError, FetchError),
        on_rows=_Finisher(Path(root), predictor.class_names, reports),
    )
    summary = score_files(source, predictor, out, options)
    shutil.rmtree(staging, ignore_errors=True)
    table = series_table(out)
    _write_series(table, series)
    rejected = sum(1 for row in series if not row.selected)
    return PacsSummary(summary, str(table), len(series), rejected)


def series_table(out: Path) -> Path:
    """``scores.csv`` -> ``scores.series.csv``: the listing's report beside the scores."""
    return out.with_name(f"{out.stem}.series.csv")


def _write_series(path: Path, rows: Sequence[SeriesRow]) -> None:
    with atomic.replace_on_success(path, "w", **CSV_FILE) as handle:
        writer = csv.writer(handle)
        writer.writerow(SERIES_COLUMNS)
        writer.writerows([safe_cell(cell) for cell in row.cells()] for row in rows)


def _tickets(root: Path, instances: Iterable[Instance]) -> Iterator[str]:
    """Each instance's key, its ticket written just before it is handed on (the engine
    skips the keys an earlier run scored; a ticket left behind costs an empty file)."""
    for instance in instances:
        ticket = root / instance.key
        ticket.parent.mkdir(parents=True, exist_ok=True)
        ticket.write_bytes(b"")
        yield instance.key


class _Finisher:
    """``FileSource.on_rows``: each ok row's SR is written and/or stored before the row is,
    then the batch's staged files go (the staging folder holds at most a window of files)."""

    def __init__(self, root: Path, class_names: Sequence[str], reports: Reports | None) -> None:
        self.root, self.class_names, self.reports = root, list(class_names), reports

    def __call__(self, rows: list[list[str]]) -> list[list[str]]:
        try:
            if self.reports is None:
                return rows
            made = {i: self._report(row) for i, row in enumerate(rows) if row[1] == "ok"}
            failed = {i: sr for i, sr in made.items() if isinstance(sr, str)}
            stored = {i: sr for i, sr in made.items() if not isinstance(sr, str)}
            if problem := self._stow(list(stored.values())):
                failed |= dict.fromkeys(stored, problem)
            return [_failed(row, failed[i]) if i in failed else row for i, row in enumerate(rows)]
        finally:
            for row in rows:
                (self.root / row[0]).unlink(missing_ok=True)

    def _report(self, row: list[str]) -> pydicom.Dataset | str:
        """The row's SR (written to the folder, if any), or why it could not be made."""
        reports = self.reports
        try:
            source = pydicom.dcmread(self.root / row[0], stop_before_pixels=True)
            probabilities = [float(p) for p in row[_FIRST_PROB:]]
            sr = build_report(source, self.class_names, probabilities, reports.algorithm,
                              reports.decisions)  # fmt: skip
            if reports.folder is not None:
                write_report(sr, reports.folder, str(source.SOPInstanceUID))
        except OSError:
            raise  # a full disk or a vanished folder stops the run (the CLI says so)
        except Exception as exc:
            return f"structured report failed: {describe(exc)}"
        return sr

    def _stow(self, reports: list[pydicom.Dataset]) -> str:
        """Store the batch's SRs in one STOW-RS request; "" when all were stored (or there is
        no STOW-RS server, or nothing to store)."""
        server = self.reports.stow
        if server is None or not reports:
            return ""
        try:
            answer = client_for(server).store_instances(reports)
        except requests.RequestException as exc:
            return f"STOW-RS failed: {http_problem(exc, server)}"
        failed = answer.get("FailedSOPSequence") if answer is not None else None
        return f"STOW-RS failed: the server refused {len(failed)} reports" if failed else ""


def _failed(row: list[str], message: str) -> list[str]:
    """An ok row turned into an error row: the probabilities go, the rest stays."""
    return [row[0], "error", message, *row[3:_FIRST_PROB], *[""] * (len(row) - _FIRST_PROB)]
