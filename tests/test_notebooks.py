"""Notebooks run top to bottom with small settings, and are stored without outputs."""

from __future__ import annotations

import json
import os

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import REPO, SHARED_DATA

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
SMALL = {
    "MT_NB_PATIENTS": "24",
    "MT_NB_EPOCHS": "1",
    "MT_NB_IMAGE_SIZE": "32",
    "MT_NB_BACKBONE": "mobilenetv3small",
}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stored_without_outputs(path):
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, path.name


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path, monkeypatch):
    settings = {**SMALL, "MT_NB_OUT": str(tmp_path / "out"), "MT_NB_SHARED": str(SHARED_DATA)}
    for key, value in settings.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    ).execute()
    images = [
        o for c in notebook.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})
    ]
    assert len(images) >= 4, "the notebook should show its figures inline"
    assert os.listdir(tmp_path / "out"), "the notebook should write its outputs under MT_NB_OUT"
