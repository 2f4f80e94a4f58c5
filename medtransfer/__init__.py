"""medtransfer: transfer learning for medical imaging.

The public API is imported lazily: decode worker processes import ``medtransfer.io`` and must not
pull TensorFlow in with it (forking or spawning a process that has initialised TensorFlow is slow
and can hang), so nothing TensorFlow-backed is imported until it is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    # name: module that defines it
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medtransfer' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
