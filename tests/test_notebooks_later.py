"""Notebooks 04 onwards run top to bottom with small settings (see test_notebooks.py)."""

from __future__ import annotations

import pytest

from .conftest import REPO, run_notebook


@pytest.mark.parametrize(
    "path",
    [p for p in sorted((REPO / "notebooks").glob("*.ipynb")) if p.name >= "04"],
    ids=lambda p: p.name,
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)
