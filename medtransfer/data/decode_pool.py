"""The process pool that decodes files for training and evaluation loads.

Decoding holds the GIL (pydicom, the JPEG 2000 and JPEG-LS codecs' Python side) and TensorFlow
must not be forked, so files are decoded in spawned worker processes. Each worker also matches
channels and resizes to the model's size (``medtransfer.io.resize``, TensorFlow's resize in
NumPy), so what crosses the pipe is a model-size image (200 KB at 224 px) rather than a full
radiograph (20 MB as float32), and the parent, which used to resize every image itself while
the workers competed for the same cores, only copies results into place. In process
(``workers=0``) the same function runs, so the pixels are the same bit for bit either way.

One ``DecodePool`` serves every load made with it (a run's train, validation and target images;
an evaluation's split and its validation split), so the pool's start-up is paid once. It is
sized to the cores this process may use and starts on its first file; a load of a few files
never starts it.

This module imports neither TensorFlow nor Keras: workers import it for ``decode_for_model``.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from medtransfer.errors import DataError
from medtransfer.io import ImageReadError, load_image
from medtransfer.io.resize import model_pixels

MAX_WORKERS = 16  # past this, a pool mostly adds memory (each worker holds its codecs)
POOL_MIN_FILES = 8  # fewer files decode faster here than a pool starts
Result = np.ndarray | ImageReadError


def usable_cores() -> int:
    """The cores this process may run on (a container's or ``taskset``'s limit included)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers() -> int:
    return min(usable_cores(), MAX_WORKERS)


def decode_for_model(
    path: str, size: tuple[int, int], channels: int, window: str | dict, frames: str
) -> Result:
    """Decode-worker entry point: one file as the model takes it, [H, W, C] float32 in [0, 1].
    Returns the error rather than raising it, so one bad file is one line in the report instead
    of the end of the load."""
    try:
        pixels = load_image(path, window=window, frames=frames).pixels
    except ImageReadError as error:
        return error
    return model_pixels(pixels, size, channels)


class DecodePool:
    """Decodes files for the model, in order, in a spawn pool shared by several loads.

    ``workers`` None sizes the pool to the usable cores (at most ``MAX_WORKERS``); 0 decodes
    in this process. Results are produced a few files ahead of the consumer, never the whole
    list at once, so memory stays bounded whatever the number of files.
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self._executor: ProcessPoolExecutor | None = None

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None

    def decode(
        self,
        paths: Sequence[str],
        size: Sequence[int],
        channels: int,
        window: str | dict,
        frames: str,
    ) -> Iterator[Result]:
        """Each file's model-size pixels (or its ``ImageReadError``), in the order given."""
        args = ((int(size[0]), int(size[1])), channels, window, frames)
        if self.workers == 0 or len(paths) < POOL_MIN_FILES:
            return (decode_for_model(path, *args) for path in paths)
        return self._in_workers(paths, args)

    def _in_workers(self, paths: Iterable[str], args: tuple) -> Iterator[Result]:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context)
        ahead = 4 * self.workers  # enough to keep every worker busy while results are copied
        pending: deque[tuple[str, Future]] = deque()
        for path in paths:
            pending.append((path, self._executor.submit(decode_for_model, path, *args)))
            if len(pending) >= ahead:
                yield self._result(*pending.popleft())
        while pending:
            yield self._result(*pending.popleft())

    def _result(self, path: str, future: Future) -> Result:
        try:
            return future.result()
        except BrokenProcessPool:
            self.close()  # a dead pool cannot be reused; the next load starts a new one
            raise DataError(
                f"a decode worker died while the pool was decoding (possibly {path}): a codec "
                "crashed or the machine ran out of memory. `medtransfer inspect` on the data "
                "folder lists the files that cannot be decoded and carries on past them."
            ) from None


Workers = int | DecodePool | None
"""How a load decodes: a number of processes (None: one per usable core; 0: here), or a
``DecodePool`` shared with other loads."""


def pool_for(workers: Workers) -> AbstractContextManager[DecodePool]:
    """A pool to use in a ``with`` block: a shared one is used and left open; for a number,
    a pool of that size, closed at the end of the block."""
    return nullcontext(workers) if isinstance(workers, DecodePool) else DecodePool(workers)
