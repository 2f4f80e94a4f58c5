"""Run a per-file function over every file under a folder and write one CSV row per file.

This is the engine shared by ``score`` and ``inspect``: both turn an archive of thousands of files
into a table, and both must survive what archives contain (corrupt files, a codec that segfaults,
the OOM killer, a run killed half-way). Three pieces, each usable alone:

- ``crawl``: the files of a folder, once each, in a stable order (the order ``os.walk`` sees).
- ``FolderPool``: applies a picklable function to files in a ``spawn`` pool, keeps a bounded
  window in flight, yields results in crawl order, and turns any failure (an exception, a worker
  that died) into that one file's error instead of the run's.
- ``folder_output.CsvOutput`` (its own module): the table, written atomically, resumable, locked.

Workers are spawned, not forked, and import only what the function's module imports: forking a
process that has initialised TensorFlow can hang.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import resource
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
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Generic, TypeVar

from medtransfer.errors import MedtransferError
from medtransfer.io import DEFAULT_MAX_PIXELS

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_WORKER_MEMORY",
    "WORKER_DIED",
    "DecodeLimits",
    "FolderError",
    "FolderPool",
    "LocalFirst",
    "Outcome",
    "check_paths",
    "crawl",
    "describe",
]

T = TypeVar("T")
WORKER_DIED = "decode worker process died on this file (out of memory or a crash in a decoder)"
# A per-file limit on a worker's time: the largest real radiographs decode in well under 2 s
# here, so a minute only ever stops a decoder caught in a loop (a known class of JPEG 2000 bug).
DEFAULT_TIMEOUT = 60.0
# A worker's address-space cap: decoding the largest real radiograph peaks near 0.25 GiB, and a
# decoder that believes a forged header (65535 x 65535) fails its allocation instead of growing
# until the kernel's OOM killer picks a process, perhaps the main one.
DEFAULT_WORKER_MEMORY = 4 * 2**30


class FolderError(MedtransferError, ValueError):
    """Arguments that make a folder run impossible or unsafe; the CLI reports them in one line."""


@dataclass(frozen=True)
class DecodeLimits:
    """What one hostile file may cost a folder run: ``timeout`` seconds of a worker,
    ``memory`` bytes of a worker's address space, ``max_pixels`` samples decoded (checked from
    the header before decoding). ``None`` lifts a limit."""

    timeout: float | None = DEFAULT_TIMEOUT
    memory: int | None = DEFAULT_WORKER_MEMORY
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise FolderError(f"need a decode time limit > 0 seconds, got {self.timeout}")
        if self.memory is not None and self.memory < 2**28:
            raise FolderError(f"need a worker memory limit of at least 256 MiB, got {self.memory}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise FolderError(f"need a pixel budget >= 1, got {self.max_pixels}")


DEFAULT_LIMITS = DecodeLimits()


# --- crawling -------------------------------------------------------------------------------------


def crawl(input_dir: str | os.PathLike) -> Iterator[str]:
    """Yield every file the contract checker (``os.walk``) sees, as sorted relative paths.

    Hidden files are included because the contract counts them; symlinked directories are not
    followed (as ``os.walk``), symlinked files are, and a symlink that cannot be resolved (a loop,
    a dangling link) is yielded as a file, whose row then says why it cannot be read. A subfolder
    that cannot be listed is yielded as ``"<rel>/"``: it becomes one error row, since its files
    cannot be known. Only one directory listing is held at a time.
    """
    root = os.fspath(input_dir)
    try:
        entries = _listing(root)
    except OSError as exc:
        raise FolderError(f"cannot list input folder {root}: {exc.strerror or exc}") from exc
    yield from _crawl(root, "", entries)


def _listing(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as listing:
        return sorted(listing, key=lambda entry: entry.name)


def _crawl(root: str, rel_dir: str, entries: list[os.DirEntry]) -> Iterator[str]:
    for entry in entries:
        rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
        if not _is_dir(entry):
            yield rel
        elif not entry.is_symlink():
            try:
                listing = _listing(entry.path)
            except OSError:
                yield rel + "/"
                continue
            yield from _crawl(root, rel, listing)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # a symlink loop: os.walk lists it as a file too
        return False


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


def unreadable(path: str) -> str:
    """Why a crawled entry cannot be given to a decoder ("" when it can), from ``stat`` alone.

    Nothing is opened: opening a FIFO blocks until a writer comes, which may be never.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        return f"cannot read file: {exc.strerror or type(exc).__name__}"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        try:
            os.scandir(path).close()
        except OSError as exc:
            return f"cannot list folder: {exc.strerror or type(exc).__name__}"
        return "cannot list folder: it could not be read while the folder was crawled"
    return f"not a regular file: {_FILE_KINDS.get(stat.S_IFMT(mode), 'special file')}"


_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}


_worker_timeout: float | None = None  # seconds per file; set in decode workers only


@contextmanager
def _deadline() -> Iterator[None]:
    """In a decode worker, end the process if the work inside takes longer than the time limit.

    The kernel delivers SIGALRM, whose default action ends the process even while a compiled
    decoder is caught in a loop (a Python handler would wait for it to return). The alarm is off
    again before the result is sent, so a worker is never killed half-way through writing it to
    the pipe it shares with the others: a partial message there would hang the pool's reader.
    """
    if _worker_timeout is None:
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, _worker_timeout)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _call(
    fn: Callable[..., T], root: str, rel: str, args: tuple, expected: tuple[type[Exception], ...]
) -> Outcome[T]:
    """Runs in a worker. Every failure becomes a message: an exception that fails to pickle or
    unpickle would break the whole pool, and one file must never stop the others."""
    try:
        path = os.path.join(root, rel)
        if problem := unreadable(path):  # checked again: the file may have changed since
            return Outcome(rel, error=problem)
        with warnings.catch_warnings(), _deadline():
            # pydicom warnings quote element values (possible PHI) and would tear progress bars.
            warnings.simplefilter("ignore")
            return Outcome(rel, fn(path, *args))
    except expected as exc:
        return Outcome(rel, error=" ".join(str(exc).split()) or "unreadable file")
    except MemoryError:
        return Outcome(rel, error="out of memory: decoding needs more than the worker memory limit")
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


def _init_worker(memory_limit: int | None, timeout: float | None) -> None:
    """Ctrl-C is the main process's to handle (workers would only print tracebacks), and a worker
    whose main process was killed must exit rather than idle on as an orphan holding memory.
    ``memory_limit`` caps the worker's address space, so a decoder fooled by a forged header
    fails one allocation (one error row) instead of exhausting the machine; ``timeout`` is the
    per-file time limit (see ``_deadline``)."""
    global _worker_timeout
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    _worker_timeout = timeout
    if memory_limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
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
        """Nothing decided in the main process may raise: a file the check cannot judge goes to
        the pool, where failures are contained."""
        try:
            return self.active and self._eligible(path)
        except Exception:
            return False

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
    starts with the first file sent to it, so a folder run wholly here never spawns it. What is
    not a regular file (a FIFO, a socket, a folder that could not be listed, a symlink loop) is
    answered here from ``stat`` alone, never opened.

    A worker gets ``limits.timeout`` seconds per file: past that it ends itself (``_deadline``)
    and the file is handled as one that killed its worker, below, with the error ``decode timed
    out after N s`` (so a file past the limit costs up to twice the limit). ``limits.memory``
    caps each worker's address space. Neither applies to files run in this process, which is why
    only files that need no compiled codec may be; the pixel budget is for ``fn`` to apply.

    When a worker dies (OOM killer, segfault in a codec, the time limit) every file in flight
    fails with BrokenProcessPool and nothing says which one was the cause, so those files are
    retried one at a time in a fresh pool: innocent files still succeed, and a file that kills a
    worker on its own gets ``WORKER_DIED`` (or the time-limit message) as its error.
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
        limits: DecodeLimits = DEFAULT_LIMITS,
    ) -> None:
        if workers < 0:
            raise FolderError(f"need workers >= 0, got {workers}")
        self._root, self._fn, self._args, self._expected = root, fn, args, expected
        self._workers, self._local = workers, local
        self._timeout, self._memory_limit = limits.timeout, limits.memory
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> FolderPool[T]:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        # On an error or Ctrl-C, queued files are dropped and the workers finish the file they
        # hold (within the time limit). They are not killed: one killed while sending its result
        # would leave a partial message that hangs the pool's reader, and this interpreter's exit.
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
        path = os.path.join(self._root, rel)
        if problem := unreadable(path):
            return _done(Outcome(rel, error=problem))
        call = (self._fn, self._root, rel, self._args, self._expected)
        if self._workers == 0:
            return _done(_call(*call))
        if self._local is not None and self._local.takes(path):
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
                initargs=(self._memory_limit, self._timeout),
            )

    def _recover(self, jobs: list[_Job]) -> None:
        self._restart()
        for job in jobs:
            if isinstance(job.future.exception(), BrokenProcessPool):
                job.future = _done(self._run_alone(job.path))

    def _run_alone(self, rel: str) -> Outcome[T]:
        job = _Job(rel, self._submit(rel))
        # the process that runs it: the pool's only busy one (private, but the only way to know)
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        try:
            return _outcome(job)
        except BrokenProcessPool:
            self._restart()
        if any(process.exitcode == -signal.SIGALRM for process in processes):
            return Outcome(rel, error=f"decode timed out after {self._timeout:g} s")
        return Outcome(rel, error=WORKER_DIED)


def _outcome(job: _Job) -> Outcome:
    """The worker's result; BrokenProcessPool propagates, anything else (e.g. arguments or a
    result that failed to pickle) becomes this file's error."""
    try:
        return job.future.result()
    except BrokenProcessPool:
        raise
    except Exception as exc:
        return Outcome(job.path, error=f"internal error: {describe(exc)}")
