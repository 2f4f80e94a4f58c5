"""``medtransfer score --engine ray``: the local engine's rows from Ray Data actors, and a killed
job that resumes from Ray's checkpoint and ends with every file exactly once.

The end-to-end tests start a local Ray instance (``ray.init()`` in the CLI's process), so they are
in the slow set: about a minute each on 2 cores.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.data import get_testdata_files

from medtransfer import ray_scoring

from .conftest import SHARED_DATA

CLI = Path(sys.executable).with_name("medtransfer")
NUMBERS = ("ood_score", "ood_percentile", "intensity_mean", "intensity_std")


def _hostile_folder(root: Path) -> Path:
    """The real corpus, the broken files, pydicom's test files, and names an attacker or a
    careless export would make: a formula, bytes that are not UTF-8, a FIFO, a line break."""
    folder = root / "archive"
    shutil.copytree(SHARED_DATA / "dicom" / "corpus", folder / "corpus")
    shutil.copytree(SHARED_DATA / "dicom" / "broken", folder / "broken")
    (folder / "pydicom").mkdir()
    for file in get_testdata_files("*.dcm"):
        shutil.copy(file, folder / "pydicom")
    real = sorted((folder / "corpus").glob("*.dcm"))
    shutil.copy(real[0], folder / "=HYPERLINK(x).dcm")
    shutil.copy(real[1], os.fsdecode(bytes(folder / "bad") + b"\xff\xfe.dcm"))
    shutil.copy(real[2], folder / "two\nlines.dcm")
    os.mkfifo(folder / "fifo.dcm")
    return folder


def _score(folder: Path, model: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), "score", str(folder), "--model", str(model), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=900,
    )


def _same_rows(local: Path, ray: Path) -> None:
    """Set equality of rows: text columns exactly, numbers within 1e-5."""
    a, b = (pd.read_csv(f, keep_default_na=False, dtype=str) for f in (local, ray))
    assert list(a.columns) == list(b.columns)
    assert b["path"].is_unique and set(a["path"]) == set(b["path"])
    a, b = a.set_index("path").sort_index(), b.set_index("path").sort_index()
    numbers = [c for c in a.columns if c in NUMBERS or c.startswith("prob_")]
    text = [c for c in a.columns if c not in numbers]
    pd.testing.assert_frame_equal(a[text], b[text])
    for column in numbers:
        x, y = (pd.to_numeric(t[column], errors="coerce").to_numpy() for t in (a, b))
        np.testing.assert_array_equal(np.isnan(x), np.isnan(y), err_msg=column)
        np.testing.assert_allclose(x[~np.isnan(x)], y[~np.isnan(y)], atol=1e-5, err_msg=column)


def test_listing_keeps_every_name_intact(tmp_path) -> None:
    """The listing Ray reads and its checkpoint's ids: each crawled name comes back byte for
    byte (raw) beside its UTF-8 display form, across shards, names with commas, quotes, line
    breaks, leading zeros and stray bytes included."""
    names = ["0001", 'a,"b".dcm', "two\nlines.dcm", os.fsdecode(b"bad\xff.dcm"), "=1+2.dcm"]
    names += [f"f{i:03d}.dcm" for i in range(ray_scoring.LISTING_SHARD + 5)]
    for name in names:
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    listing = tmp_path / "staging" / "listing"
    pairs = ray_scoring._listing(str(tmp_path / "in"), listing)
    assert [raw for _, raw in pairs] == sorted(names)
    assert dict(pairs)["bad\\xff.dcm"] == os.fsdecode(b"bad\xff.dcm")
    assert len(list(listing.iterdir())) == 2  # shards of LISTING_SHARD paths
    (tmp_path / "in" / "new.dcm").write_bytes(b"x")  # arrives after the listing was made
    assert ray_scoring._listing(str(tmp_path / "in"), listing) == pairs


@pytest.mark.slow
def test_ray_gives_the_local_rows(tiny_run, tmp_path) -> None:
    folder = _hostile_folder(tmp_path)
    local, ray = tmp_path / "local.csv", tmp_path / "ray.csv"
    assert _score(folder, tiny_run, local, "--no-progress").returncode == 1  # error rows
    done = _score(folder, tiny_run, ray, "--engine", "ray")
    assert done.returncode == 1, done.stderr[-3000:]
    _same_rows(local, ray)
    table = pd.read_csv(ray, keep_default_na=False)
    assert (table["status"] == "error").sum() >= 10  # the broken files, the FIFO
    assert "'=HYPERLINK(x).dcm" in set(table["path"]) and "bad\\xff\\xfe.dcm" in set(table["path"])
    assert not ray.with_name(ray.name + ray_scoring.STAGING_SUFFIX).exists()


@pytest.mark.slow
def test_a_killed_ray_job_resumes_and_scores_every_file_once(tiny_run, tmp_path) -> None:
    folder = tmp_path / "archive"
    for copy in range(5):  # 195 real files: four listing shards
        shutil.copytree(SHARED_DATA / "dicom" / "corpus", folder / f"copy{copy}")
    out = tmp_path / "out" / "scores.csv"
    out.parent.mkdir()
    parts = out.with_name(out.name + ray_scoring.STAGING_SUFFIX) / "parts"
    command = [str(CLI), "score", str(folder), "--model", str(tiny_run), "--out", str(out)]
    job = subprocess.Popen([*command, "--engine", "ray"], start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while not any(parts.glob("*.parquet")) and job.poll() is None:
            assert time.monotonic() < deadline, "no part written in 600 s"
            time.sleep(0.2)
    finally:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    assert not out.exists()
    resumed = subprocess.run([*command, "--engine", "ray", "--resume"], capture_output=True,
                             text=True, timeout=900)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    kept = int(resumed.stdout.split(" kept from a previous run")[0].rsplit("(", 1)[1])
    assert 0 < kept < 195, resumed.stdout
    local = tmp_path / "local.csv"
    assert _score(folder, tiny_run, local, "--no-progress").returncode == 0
    _same_rows(local, out)
    assert len(pd.read_csv(out)) == 195
