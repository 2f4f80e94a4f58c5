"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


@contextmanager
def replace_on_success(path: str | Path, mode: str = "w", **open_kwargs: Any) -> Iterator[IO]:
    """Stream into a temp file beside ``path``; ``os.replace`` it into place only on success."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; keep the usual mode
        with open(fd, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    with replace_on_success(path, "wb") as handle:
        handle.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (inf, -inf, NaN) replaced by None, recursively.

    ``json.dumps`` writes those as bare ``Infinity``/``NaN``, which is not JSON: JavaScript's
    ``JSON.parse`` and most other parsers reject the whole file. A writer whose reader needs
    to know what a null stood for records that next to it (see ``evaluation.report``).
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Write ``value`` as strict JSON (non-finite floats as null), atomically."""
    write_text(path, json.dumps(json_safe(value), indent=2, allow_nan=False) + "\n")


def float_or(value: float | None, null: float = math.nan) -> float:
    """A number read back from a file :func:`write_json` wrote: null becomes ``null``'s value
    (NaN unless the field's writer documents another meaning, e.g. +inf for a threshold)."""
    return null if value is None else float(value)


def is_occupied(path: str | Path) -> bool:
    """Whether ``path`` exists as something other than an empty folder: an output that a
    command must not write into unless told to overwrite."""
    target = Path(path)
    if target.is_dir() and not target.is_symlink():
        return any(target.iterdir())
    return target.exists() or target.is_symlink()
