"""Batch scoring of folders: every file under a folder becomes exactly one row of ``scores.csv``.

Decoding (GIL-bound, up to ~1 s for a large JPEG 2000 radiograph) runs in a ``spawn`` pool that
imports only ``medtransfer.io``, so TensorFlow is never forked or loaded twice; the main process
keeps a bounded window of files in flight and predicts in batches while the workers decode ahead.

Rows are appended in crawl order to ``<out>.partial`` as each batch finishes, so a killed run loses
at most one batch; ``resume=True`` keeps the longest valid prefix of that file and scores the rest.
The final file replaces the output atomically, so readers never see half a table.
"""

from __future__ import annotations

import csv
import io
import multiprocessing
import multiprocessing.connection
import os
import signal
import stat
import threading
import time
import traceback
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Set
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from tqdm import tqdm

from medtransfer import atomic
from medtransfer.errors import MedtransferError
from medtransfer.io import ImageReadError, load_image

BASE_COLUMNS = ("path", "status", "error", "sop_instance_uid")
# newline="" lets the csv module quote newlines in paths; surrogateescape keeps undecodable
# (non-UTF-8) file names byte-exact instead of failing on them.
_CSV_FILE: dict[str, Any] = {"encoding": "utf-8", "errors": "surrogateescape", "newline": ""}
WORKER_DIED = "decode worker process died on this file (out of memory or a crash in a decoder)"


class ScoringError(MedtransferError, ValueError):
    """Arguments that make scoring impossible or unsafe; the CLI reports them in one line."""


class Predictor(Protocol):
    """What scoring needs from a model; ``medtransfer.export`` provides one for a saved model."""

    class_names: list[str]
    window: str | dict
    frames: str

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        """Variable-size [H,W] or [H,W,3] float32 images in [0, 1] -> [len, K] probabilities."""
        ...


@dataclass
class ScoreSummary:
    """Counts describe the whole output file, so ``exit_code`` reflects what the CSV holds."""

    out_csv: str
    n_files: int
    n_ok: int
    n_error: int
    n_resumed: int
    seconds: float
    files_per_second: float

    @property
    def exit_code(self) -> int:
        """CLI contract: 0 when every file scored, 1 when some files are error rows."""
        return 1 if self.n_error else 0

    def __str__(self) -> str:
        resumed = f" ({self.n_resumed} kept from a previous run)" if self.n_resumed else ""
        return (
            f"{self.n_files} files{resumed}: {self.n_ok} ok, {self.n_error} errors. "
            f"Scored {self.n_files - self.n_resumed} in {self.seconds:.1f} s "
            f"({self.files_per_second:.1f} files/s). Wrote {self.out_csv}."
        )


class _Decoded(NamedTuple):
    """Worker result: plain values only, so it always pickles back to the main process."""

    pixels: np.ndarray | None = None
    sop_instance_uid: str = ""
    error: str = ""


@dataclass
class _Job:
    path: str  # relative to the input folder, forward slashes
    future: Future


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


def score_folder(
    input_dir: str | os.PathLike,
    predictor: Predictor,
    out_csv: str | os.PathLike,
    *,
    workers: int = 2,
    batch_size: int = 16,
    resume: bool = False,
    progress: bool = True,
) -> ScoreSummary:
    """Score every file under ``input_dir`` into ``out_csv`` (see the ``scores.csv`` contract).

    Unreadable files become error rows rather than exceptions: one bad file in an archive must not
    stop the other thousands. ``workers=0`` decodes in this process, for debugging.
    Raises ScoringError (a ValueError) when ``out_csv`` lies inside ``input_dir``: it would be
    crawled as an input, and nothing may be written into the input folder.
    """
    if workers < 0 or batch_size < 1:
        raise ScoringError(f"need workers >= 0 and batch_size >= 1, got {workers} and {batch_size}")
    start = time.monotonic()
    root, out = _check_paths(input_dir, out_csv)
    columns = [*BASE_COLUMNS, *_prob_columns(predictor.class_names)]
    partial = out.with_name(out.name + ".partial")
    done = _restart_partial(partial, out, columns, resume)  # path -> status, from an earlier run
    seen_done: set[str] = set()

    def to_score() -> Iterator[str]:
        for path in crawl(root):
            if path in done:
                seen_done.add(path)
            else:
                yield path

    counts: Counter[str] = Counter()
    with (
        open(partial, "a", **_CSV_FILE) as sink,
        _Decoder(root, workers, predictor.window, predictor.frames) as decoder,
        tqdm(desc="scoring", unit=" files", disable=not progress, dynamic_ncols=True) as bar,
    ):
        writer = csv.writer(sink)
        # One batch being assembled and one decoding ahead of it, plus a file per worker: enough
        # to keep workers busy while the model runs, few enough to bound memory (decoded images).
        max_in_flight = 2 * (batch_size + max(workers, 1))
        for rows in _score_batches(to_score(), decoder, predictor, batch_size, max_in_flight):
            writer.writerows(rows)
            sink.flush()
            counts.update(row[1] for row in rows)
            bar.update(len(rows))
            bar.set_postfix(errors=counts["error"], refresh=False)

    seconds = time.monotonic() - start
    n_scored = counts.total()
    counts.update(done[path] for path in seen_done)
    _finalise(partial, out, stale=done.keys() - seen_done)
    return ScoreSummary(
        out_csv=str(out),
        n_files=counts.total(),
        n_ok=counts["ok"],
        n_error=counts["error"],
        n_resumed=len(seen_done),
        seconds=seconds,
        files_per_second=n_scored / seconds if seconds else 0.0,
    )


def _check_paths(input_dir: str | os.PathLike, out_csv: str | os.PathLike) -> tuple[str, Path]:
    root = Path(input_dir).resolve()
    if not root.is_dir():
        raise ScoringError(f"input folder {input_dir} does not exist or is not a folder")
    out = Path(out_csv).resolve()
    if out.is_relative_to(root):
        raise ScoringError(
            f"output {out_csv} is inside the input folder {input_dir}: it would be scored as an "
            "input and the input folder would be modified; write it somewhere else"
        )
    if out.is_dir():
        raise ScoringError(f"output {out_csv} is a folder; give a file name like scores.csv")
    out.parent.mkdir(parents=True, exist_ok=True)
    return str(root), out


def _prob_columns(class_names: Iterable[str]) -> list[str]:
    names = list(class_names)
    if not names or len(set(names)) != len(names):
        raise ScoringError(f"predictor class_names must be non-empty and unique, got {names}")
    return [f"prob_{name}" for name in names]


# --- decoding -------------------------------------------------------------------------------------


def _decode_file(path: str, window: str | dict, frames: str) -> _Decoded:
    """Runs in a worker. Every failure becomes a message: an exception that fails to pickle or
    unpickle would break the whole pool, and one file must never stop the batch."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return _Decoded(error="not a regular file")
        with warnings.catch_warnings():
            # pydicom warnings quote element values (possible PHI) and would tear the progress bar.
            warnings.simplefilter("ignore")
            image = load_image(path, window=window, frames=frames)
        return _Decoded(np.asarray(image.pixels, dtype=np.float32), image.sop_instance_uid)
    except ImageReadError as exc:
        return _Decoded(error=_one_line(str(exc)))
    except OSError as exc:
        return _Decoded(error=f"cannot read file: {exc.strerror or type(exc).__name__}")
    except Exception as exc:
        return _Decoded(error=f"internal error: {_describe(exc)}")


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unreadable file"


def _describe(exc: BaseException) -> str:
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


def _outcome(future: Future) -> _Decoded:
    """The worker's result; BrokenProcessPool propagates, anything else (e.g. arguments or a result
    that failed to pickle) becomes this file's error."""
    try:
        return future.result()
    except BrokenProcessPool:
        raise
    except Exception as exc:
        return _Decoded(error=f"internal error: {_describe(exc)}")


def _done(result: _Decoded) -> Future:
    future: Future = Future()
    future.set_result(result)
    return future


class _Decoder:
    """Decodes files in a spawn pool (or in-process for ``workers=0``) and survives worker deaths.

    When a worker dies (OOM killer, segfault in a codec) every file in flight fails with
    BrokenProcessPool and nothing says which one was the cause, so those files are retried one at
    a time in a fresh pool: innocent files still score, and a file that kills a worker on its own
    becomes an error row.
    """

    def __init__(self, root: str, workers: int, window: str | dict, frames: str) -> None:
        self._root, self._workers, self._args = root, workers, (window, frames)
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> _Decoder:
        self._restart()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=exc_info[0] is None, cancel_futures=True)

    def submit(self, rel: str) -> Future:
        path = os.path.join(self._root, rel)
        if self._pool is None:
            return _done(_decode_file(path, *self._args))
        try:
            return self._pool.submit(_decode_file, path, *self._args)
        except BrokenProcessPool as exc:  # a worker died while idle: recovered when this job is due
            future: Future = Future()
            future.set_exception(exc)
            return future

    def result(self, job: _Job, pending: Iterable[_Job]) -> _Decoded:
        """Wait for ``job``; on a dead worker, first re-decode it and the other ``pending`` jobs."""
        try:
            return _outcome(job.future)
        except BrokenProcessPool:
            self._recover([job, *pending])
        return _outcome(job.future)

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
                job.future = _done(self._decode_alone(job.path))

    def _decode_alone(self, rel: str) -> _Decoded:
        try:
            return _outcome(self.submit(rel))
        except BrokenProcessPool:
            self._restart()
            return _Decoded(error=WORKER_DIED)


# --- predicting -----------------------------------------------------------------------------------


def _score_batches(
    paths: Iterator[str],
    decoder: _Decoder,
    predictor: Predictor,
    batch_size: int,
    max_in_flight: int,
) -> Iterator[list[list[str]]]:
    """Yield rows batch by batch in crawl order, keeping at most ``max_in_flight`` files decoding.

    Crawl order makes the partial file a prefix of the final one, which is what resume relies on;
    the workers keep decoding the window ahead while the predictor runs on the current batch.
    """
    jobs: deque[_Job] = deque()
    batch: list[tuple[str, _Decoded]] = []
    while True:
        jobs.extend(_Job(p, decoder.submit(p)) for p in islice(paths, max_in_flight - len(jobs)))
        if not jobs:
            break
        job = jobs.popleft()
        batch.append((job.path, decoder.result(job, jobs)))
        if len(batch) == batch_size or not jobs:
            yield _predict_rows(batch, predictor)
            batch = []


def _predict_rows(batch: list[tuple[str, _Decoded]], predictor: Predictor) -> list[list[str]]:
    images = [decoded.pixels for _, decoded in batch if decoded.pixels is not None]
    outcomes = iter(_predict(predictor, images) if images else [])
    no_probs = [""] * len(predictor.class_names)
    rows = []
    for path, decoded in batch:
        outcome = decoded.error or next(outcomes)
        if isinstance(outcome, str):
            rows.append([path, "error", outcome, decoded.sop_instance_uid, *no_probs])
        else:
            rows.append([path, "ok", "", decoded.sop_instance_uid, *map(_format_prob, outcome)])
    return rows


def _predict(predictor: Predictor, images: list[np.ndarray]) -> list[np.ndarray | str]:
    """Probabilities or an error message per image. A batch that fails is retried image by image,
    so one image the model cannot take only costs its own row."""
    try:
        probs = _predict_array(predictor, images)
    except Exception as exc:
        if len(images) == 1:
            return [f"prediction failed: {_describe(exc)}"]
        return [outcome for image in images for outcome in _predict(predictor, [image])]
    return [_check_probs(p) for p in probs]


def _predict_array(predictor: Predictor, images: list[np.ndarray]) -> np.ndarray:
    probs = np.asarray(predictor.predict(images), dtype=np.float32)
    expected = (len(images), len(predictor.class_names))
    if probs.shape != expected:
        raise ValueError(f"predictor returned shape {probs.shape}, expected {expected}")
    return probs


def _check_probs(probs: np.ndarray) -> np.ndarray | str:
    if np.all(np.isfinite(probs)) and np.all((probs >= 0) & (probs <= 1)):
        return probs
    return "model returned probabilities that are not finite numbers in [0, 1]"


def _format_prob(value: np.float32) -> str:
    """Shortest text that reads back as the same float32."""
    return np.format_float_positional(value, unique=True, trim="-")


# --- output files ---------------------------------------------------------------------------------


def _restart_partial(partial: Path, out: Path, columns: list[str], resume: bool) -> dict[str, str]:
    """Start the partial file with the rows kept from an earlier run; return their statuses."""
    previous = _read_previous(partial, out, columns) if resume else []
    with atomic.replace_on_success(partial, "w", **_CSV_FILE) as handle:
        csv.writer(handle).writerows([columns, *previous])
    return {row[0]: row[1] for row in previous}


def _finalise(partial: Path, out: Path, stale: Set[str]) -> None:
    """Publish the partial file as the output, without rows for files that have since vanished."""
    with (
        open(partial, **_CSV_FILE) as source,
        atomic.replace_on_success(out, "w", **_CSV_FILE) as target,
    ):
        writer = csv.writer(target)
        writer.writerows(row for row in csv.reader(source) if row[0] not in stale)
    partial.unlink()


def _read_previous(partial: Path, out: Path, columns: list[str]) -> list[list[str]]:
    """Rows of an interrupted (partial) or finished (out) earlier run, partial first as newer."""
    source = partial if partial.exists() else out
    if not source.exists():
        return []
    with open(source, **_CSV_FILE) as handle:
        text = handle.read()
    records = list(csv.reader(io.StringIO(text)))
    if not text.endswith("\r\n"):
        records = records[:-1]  # torn last line of a killed run
    if not records:
        return []
    if records[0] != columns:
        raise ScoringError(
            f"cannot resume from {source}: it has columns {records[0]}, this model needs "
            f"{columns}; write to a new output or score without resume"
        )
    return _valid_prefix(records[1:], len(columns))


def _valid_prefix(records: list[list[str]], n_columns: int) -> list[list[str]]:
    """Keep rows up to the first one that is torn or malformed: dropping a good row only costs a
    rescore, keeping a bad one would put a wrong value in the output."""
    kept: list[list[str]] = []
    seen: set[str] = set()
    for row in records:
        if len(row) != n_columns or row[0] in seen or not _row_is_valid(row):
            break
        seen.add(row[0])
        kept.append(row)
    return kept


def _row_is_valid(row: list[str]) -> bool:
    status, error, probs = row[1], row[2], row[len(BASE_COLUMNS) :]
    if status == "error":
        return bool(error) and not any(probs)
    if status != "ok" or error:
        return False
    try:
        return all(0 <= float(p) <= 1 for p in probs)
    except ValueError:
        return False
