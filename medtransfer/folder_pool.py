"""Run a per-file function over every file under a folder and write one CSV row per file.

This is the engine shared by ``score`` and ``inspect``: both turn an archive of thousands of files
into a table, and both must survive what archives contain (corrupt files, a codec that segfaults,
the OOM killer, a run killed half-way). Three pieces, each usable alone:

- ``crawl``: the files of a folder, once each, in a stable order (the order ``os.walk`` sees).
- ``FolderPool``: applies a picklable function to files in a ``spawn`` pool, keeps a bounded
  window in flight, yields results in crawl order, and turns any failure (an exception, a worker
  that died) into that one file's error instead of the run's.
- ``CsvOutput``: appends rows to ``<out>.partial`` as they come, resumes from its longest valid
  prefix, and publishes the finished table atomically, so readers never see half a table.

Workers are spawned, not forked, and import only what the function's module imports: forking a
process that has initialised TensorFlow can hang.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import multiprocessing.connection
import os
import signal
import stat
import statistics
import threading
import time
import traceback
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from medtransfer import atomic
from medtransfer.errors import MedtransferError

__all__ = [
    "WORKER_DIED",
    "CsvOutput",
    "FolderError",
    "FolderPool",
    "LocalFirst",
    "Outcome",
    "ParquetOutput",
    "check_paths",
    "crawl",
    "describe",
]

T = TypeVar("T")
WORKER_DIED = "decode worker process died on this file (out of memory or a crash in a decoder)"
# newline="" lets the csv module quote newlines in paths; surrogateescape keeps undecodable
# (non-UTF-8) file names byte-exact instead of failing on them.
CSV_FILE: dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}


class FolderError(MedtransferError, ValueError):
    """Arguments that make a folder run impossible or unsafe; the CLI reports them in one line."""


# --- crawling -------------------------------------------------------------------------------------


def crawl(input_dir: str | os.PathLike) -> Iterator[str]:
    """Yield every file the contract checker (``os.walk``) sees, as sorted relative paths.

    Hidden files are included because the contract counts them; symlinked directories are not
    followed (as ``os.walk``), symlinked files are. Only one directory listing is held at a time.
    """
    yield from _crawl(os.fspath(input_dir), "")


def _crawl(root: str, rel_dir: str) -> Iterator[str]:
    with os.scandir(os.path.join(root, rel_dir)) as listing:
        entries = sorted(listing, key=lambda entry: entry.name)
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        if not entry.is_dir():
            yield rel
        elif not entry.is_symlink():
            yield from _crawl(root, rel)


def check_paths(input_dir: str | os.PathLike, out_csv: str | os.PathLike) -> tuple[str, Path]:
    """Resolve the input folder and the output file, refusing an output inside the input: it
    would be crawled as an input, and nothing may be written into the folder being read."""
    root = Path(input_dir).resolve()
    if not root.is_dir():
        raise FolderError(f"input folder {input_dir} does not exist or is not a folder")
    out = Path(out_csv).resolve()
    if out.is_relative_to(root):
        raise FolderError(
            f"output {out_csv} is inside the input folder {input_dir}: it would be read as an "
            "input and the input folder would be modified; write it somewhere else"
        )
    if out.is_dir():
        raise FolderError(f"output {out_csv} is a folder; give a file name like out.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    return str(root), out


# --- the pool -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One file's result: ``value`` from the function, or a one-line ``error`` (never both).

    Plain values only, so it always pickles back from a worker.
    """

    path: str  # relative to the folder, forward slashes
    value: T | None = None
    error: str = ""


def _call(
    fn: Callable[..., T], root: str, rel: str, args: tuple, expected: tuple[type[Exception], ...]
) -> Outcome[T]:
    """Runs in a worker. Every failure becomes a message: an exception that fails to pickle or
    unpickle would break the whole pool, and one file must never stop the others."""
    try:
        path = os.path.join(root, rel)
        if not stat.S_ISREG(os.stat(path).st_mode):
            return Outcome(rel, error="not a regular file")
        with warnings.catch_warnings():
            # pydicom warnings quote element values (possible PHI) and would tear progress bars.
            warnings.simplefilter("ignore")
            return Outcome(rel, fn(path, *args))
    except expected as exc:
        return Outcome(rel, error=" ".join(str(exc).split()) or "unreadable file")
    except OSError as exc:
        return Outcome(rel, error=f"cannot read file: {exc.strerror or type(exc).__name__}")
    except Exception as exc:
        return Outcome(rel, error=f"internal error: {describe(exc)}")


def describe(exc: BaseException) -> str:
    """Name the exception type and where it was raised, not its message: messages from decoders
    can quote DICOM element values, which may be PHI."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}{where}"


def _init_worker() -> None:
    """Ctrl-C is the main process's to handle (workers would only print tracebacks), and a worker
    whose main process was killed must exit rather than idle on as an orphan holding memory."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_when_closed, args=(parent.sentinel,), daemon=True).start()


def _exit_when_closed(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _done(result: Outcome) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


class LocalFirst:
    """Which files a ``FolderPool`` runs in this process rather than in a worker.

    A worker's result costs twice: pickling it through a pipe (a 512x512 float32 image is 1 MB)
    and, on a small machine, CPU taken from the model. For a file whose work is cheap and cannot
    crash the process (``eligible``: uncompressed DICOM needs no compiled codec) running it here
    is cheaper, while it stays a small ``share`` of the caller's own time per file
    (``per_file_budget``, e.g. the model's, updated by the caller as it is measured). Once the
    median of the last few local runs exceeds that, every later file goes to the pool: a slow
    disk or huge images make the pool worth its overhead again.
    """

    WINDOW = 8  # recent local runs whose median decides
    MIN_RUNS = 3  # before deciding, so that one slow first read (cold cache) does not

    def __init__(self, eligible: Callable[[str], bool], share: float = 0.25) -> None:
        self._eligible, self.share = eligible, share
        self.per_file_budget: float | None = None  # seconds; None: not known yet
        self.active = True
        self.local_runs = 0
        self._recent: deque[float] = deque(maxlen=self.WINDOW)

    def takes(self, path: str) -> bool:
        return self.active and self._eligible(path)

    def record(self, seconds: float) -> None:
        self.local_runs += 1
        self._recent.append(seconds)
        if self.per_file_budget is None or len(self._recent) < self.MIN_RUNS:
            return
        if statistics.median(self._recent) > self.share * self.per_file_budget:
            self.active = False


@dataclass
class _Job:
    path: str
    future: Future


class FolderPool(Generic[T]):
    """Applies ``fn(absolute_path, *args)`` to files of ``root`` and survives worker deaths.

    ``fn`` must be a module-level function (it is pickled by reference) whose module does not
    import TensorFlow. Exceptions of the ``expected`` types become their own message as the
    file's error; any other exception becomes ``internal error: <type> at <file:line>``.
    ``workers=0`` runs ``fn`` in this process, for debugging and small folders; ``local`` runs
    the files it takes in this process and the rest in workers (see ``LocalFirst``). The pool
    starts with the first file sent to it, so a folder run wholly here never spawns it.

    When a worker dies (OOM killer, segfault in a codec) every file in flight fails with
    BrokenProcessPool and nothing says which one was the cause, so those files are retried one at
    a time in a fresh pool: innocent files still succeed, and a file that kills a worker on its
    own gets ``WORKER_DIED`` as its error.
    """

    def __init__(
        self,
        root: str,
        fn: Callable[..., T],
        args: tuple = (),
        *,
        workers: int = 2,
        expected: tuple[type[Exception], ...] = (),
        local: LocalFirst | None = None,
    ) -> None:
        if workers < 0:
            raise FolderError(f"need workers >= 0, got {workers}")
        self._root, self._fn, self._args, self._expected = root, fn, args, expected
        self._workers, self._local = workers, local
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> FolderPool[T]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc_info[0] is None, cancel_futures=True)

    def imap(self, paths: Iterable[str], max_in_flight: int) -> Iterator[Outcome[T]]:
        """Yield one Outcome per path, in the order given, with at most ``max_in_flight`` files
        submitted ahead. Order makes a partial output a prefix of the final one (what resume
        relies on); the window keeps workers busy while the caller works on earlier results,
        and bounds the memory held by finished results waiting their turn."""
        paths = iter(paths)
        jobs: deque[_Job] = deque()
        while True:
            jobs.extend(_Job(p, self._submit(p)) for p in islice(paths, max_in_flight - len(jobs)))
            if not jobs:
                return
            job = jobs.popleft()
            yield self._result(job, jobs)

    def _submit(self, rel: str) -> Future:
        call = (self._fn, self._root, rel, self._args, self._expected)
        if self._workers == 0:
            return _done(_call(*call))
        if self._local is not None and self._local.takes(os.path.join(self._root, rel)):
            start = time.perf_counter()
            outcome = _call(*call)
            self._local.record(time.perf_counter() - start)
            return _done(outcome)
        if self._pool is None:
            self._restart()
        try:
            return self._pool.submit(_call, *call)
        except BrokenProcessPool as exc:  # a worker died while idle: recovered when this job is due
            future: Future = Future()
            future.set_exception(exc)
            return future

    def _result(self, job: _Job, pending: Iterable[_Job]) -> Outcome[T]:
        """Wait for ``job``; on a dead worker, first re-run it and the other ``pending`` jobs."""
        try:
            return _outcome(job)
        except BrokenProcessPool:
            self._recover([job, *pending])
        return _outcome(job)

    def _restart(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._workers > 0:
            self._pool = ProcessPoolExecutor(
                self._workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
            )

    def _recover(self, jobs: list[_Job]) -> None:
        self._restart()
        for job in jobs:
            if isinstance(job.future.exception(), BrokenProcessPool):
                job.future = _done(self._run_alone(job.path))

    def _run_alone(self, rel: str) -> Outcome[T]:
        try:
            return _outcome(_Job(rel, self._submit(rel)))
        except BrokenProcessPool:
            self._restart()
            return Outcome(rel, error=WORKER_DIED)


def _outcome(job: _Job) -> Outcome:
    """The worker's result; BrokenProcessPool propagates, anything else (e.g. arguments or a result
    that failed to pickle) becomes this file's error."""
    try:
        return job.future.result()
    except BrokenProcessPool:
        raise
    except Exception as exc:
        return Outcome(job.path, error=f"internal error: {describe(exc)}")


# --- the output file ------------------------------------------------------------------------------


def _csv_records(path: Path) -> list[list[str]]:
    """A CSV file's records, without a torn last line (a run killed mid-write)."""
    with open(path, **CSV_FILE) as handle:
        text = handle.read()
    records = list(csv.reader(io.StringIO(text)))
    return records if text.endswith("\r\n") else records[:-1]


class CsvOutput:
    """``out`` written through ``<out>.partial``: rows are appended (and flushed) as they come,
    so a killed run loses at most the rows not yet written; the finished file replaces ``out``
    atomically.

    With ``resume=True`` the rows of an earlier run (its partial file, else its finished output)
    are kept up to the first torn or invalid one (``row_is_valid`` judges a row of the right
    length): ``pending`` then skips their files, and ``kept_rows`` holds those still present.
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
        previous = self._read_previous() if resume else []
        with atomic.replace_on_success(self.partial, "w", **CSV_FILE) as handle:
            csv.writer(handle).writerows([columns, *previous])
        self._previous = {row[0]: row for row in previous}
        self.kept_rows: list[list[str]] = []
        self._sink: io.TextIOBase | None = None

    def pending(self, paths: Iterable[str]) -> Iterator[str]:
        """The paths that still need a row; rows kept for the others go to ``kept_rows``."""
        for path in paths:
            if path in self._previous:
                self.kept_rows.append(self._previous[path])
            else:
                yield path

    def __enter__(self) -> CsvOutput:
        self._sink = open(self.partial, "a", **CSV_FILE)  # closed in __exit__
        self._writer = csv.writer(self._sink)
        return self

    def write(self, rows: list[list[str]]) -> None:
        self._writer.writerows(rows)
        self._sink.flush()

    def __exit__(self, *exc_info: Any) -> None:
        self._sink.close()
        if exc_info[0] is None:
            kept = {row[0] for row in self.kept_rows}
            self._finalise(stale=self._previous.keys() - kept)

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
