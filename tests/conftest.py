"""Shared fixtures. Real data is read from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The decode cache defaults to ~/.cache/medtransfer; tests (and the CLI and notebook processes
# they start, which inherit this) keep theirs in a throwaway folder.
# One per process: pytest-xdist workers each keep (and remove) their own.
_TEST_CACHE = tempfile.mkdtemp(prefix="medtransfer-test-cache-")
os.environ["MEDTRANSFER_CACHE"] = _TEST_CACHE

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
SHARED_TOOLS = REPO.parent / "shared" / "tools"


@pytest.fixture(scope="session", autouse=True)
def _remove_test_cache():
    yield
    shutil.rmtree(_TEST_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared test data not found at {SHARED_DATA}")
    return SHARED_DATA


def make_png_folders(root: Path, per_class: int = 12, size: int = 40, seed: int = 0) -> Path:
    """A two-class folder dataset: 'spot' images carry a bright square, 'plain' ones do not."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 2), ("test", per_class // 2)):
        for label in ("plain", "spot"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                image = rng.integers(40, 90, (size, size), dtype=np.uint8)
                if label == "spot":
                    y, x = rng.integers(4, size - 14, 2)
                    image[y : y + 10, x : x + 10] = 230
                Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A real (1-epoch, 32 px, MobileNetV3Small) training run on generated PNG folders."""
    from medtransfer.spec import spec_from_dict
    from medtransfer.training.run import train

    root = tmp_path_factory.mktemp("tiny")
    spec = spec_from_dict(tiny_config(make_png_folders(root / "data")), base_dir=root)
    return train(spec, root / "run", workers=0).path


def tiny_config(data: Path, name: str = "tiny") -> dict:
    """The spec of ``tiny_run`` for a folders dataset at ``data`` (plain / spot)."""
    return {
        "name": name,
        "task": "binary",
        "classes": ["plain", "spot"],
        "data": {"format": "folders", "path": str(data)},
        "image": {"size": [32, 32], "channels": 1},
        "model": {"backbone": "mobilenetv3small", "weights": "none"},
        "training": {"epochs": 1, "batch_size": 8},
    }


NOTEBOOK_SETTINGS = {
    "MT_NB_PATIENTS": "24",
    "MT_NB_EPOCHS": "1",
    "MT_NB_IMAGE_SIZE": "32",
    "MT_NB_BACKBONE": "mobilenetv3small",
}


def run_notebook(path: Path, tmp_path: Path, monkeypatch) -> None:
    """Execute a notebook with small settings; it must show figures and write under MT_NB_OUT."""
    import nbformat
    from nbclient import NotebookClient

    settings = {**NOTEBOOK_SETTINGS, "MT_NB_OUT": str(tmp_path / "out")}
    for key, value in {**settings, "MT_NB_SHARED": str(SHARED_DATA)}.items():
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
