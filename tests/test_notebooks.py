"""Notebooks run top to bottom with small settings, and are stored without outputs.

The runs are split over two modules (this one: data and training notebooks 01-03; the other:
notebooks 04 onwards) so that ``pytest -n 2 --dist loadfile`` can run them on both workers.
"""

from __future__ import annotations

import json

import pytest

from .conftest import REPO, run_notebook

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
# ~110 s even with small settings: `make test-all` runs it
SLOW = {"03_fine_tuning.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW else p
        for p in NOTEBOOKS
        if p.name < "04"
    ],
    ids=lambda p: p.name,
)
def test_notebook_runs(path, tmp_path, monkeypatch):
    run_notebook(path, tmp_path, monkeypatch)
