"""Scoring a folder: every file one row, bad files as error rows, inputs untouched, resumable.

A deterministic fake predictor stands in for a model, so these tests need no TensorFlow.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
from PIL import Image

from medtransfer.errors import MedtransferError
from medtransfer.io import load_image
from medtransfer.io.resize import model_pixels
from medtransfer.scoring import WORKER_DIED, crawl, score_folder

TESTS = Path(__file__).resolve().parent
SHARED = Path(__file__).resolve().parents[2] / "shared"
CORPUS = SHARED / "data" / "dicom" / "corpus"
BROKEN = SHARED / "data" / "dicom" / "broken"
CHECK_SCORES = SHARED / "tools" / "check_scores.py"
# Every file of broken/, including the two that pydicom itself would decode: OT-PAL-8-face.dcm
# (no Transfer Syntax) and JPEGLossless_1s_1f_i_16_16_bad.dcm (garbage Hounsfield values).
UNDECODABLE = sorted(os.listdir(BROKEN))
PYDICOM_FILES = ["CT_small.dcm", "MR_truncated.dcm", "no_meta.dcm", "rtplan.dcm"]
ODD_NAME = 'odd, "quoted"\nname.png'


class MeanPredictor:
    """Stand-in model: P(high) is the image's mean intensity, so every row can be recomputed."""

    class_names = ["low", "high"]  # noqa: RUF012 (the Predictor protocol's attribute)
    window = "dicom"
    frames = "first"
    tabular = ()
    image_size = (32, 32)
    channels = 1
    profile = None  # no training profile: every in_scope is 'unknown'
    ood_validation = None  # no OOD score

    def __init__(self, delay_per_image: float = 0.0) -> None:
        self.delay_per_image = delay_per_image

    def predict_with_ood(self, images: list[np.ndarray]) -> tuple[np.ndarray, None]:
        return self.predict(images), None

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        time.sleep(self.delay_per_image * len(images))
        high = np.array([np.mean(image) for image in images], dtype=np.float32)
        return np.stack([1 - high, high], axis=1)


def expected_probs(path: Path) -> list[np.float32]:
    """What the model gets: the decoded image at its size (scoring resizes as it decodes)."""
    image = load_image(path, window=MeanPredictor.window, frames=MeanPredictor.frames)
    pixels = model_pixels(image.pixels, MeanPredictor.image_size, MeanPredictor.channels)
    return list(MeanPredictor().predict([pixels])[0])


def read_rows(out_csv: Path) -> list[dict[str, str]]:
    with open(out_csv, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def by_path(out_csv: Path) -> dict[str, dict[str, str]]:
    rows = read_rows(out_csv)
    table = {row["path"]: row for row in rows}
    assert len(table) == len(rows), "a path appears more than once"
    return table


def tree_digest(folder: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in crawl(folder)}


def check_scores(folder: Path, out_csv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(CHECK_SCORES), str(folder), str(out_csv)],
        capture_output=True,
        text=True,
        check=False,
    )


def write_png(path: Path, value: int, size: int = 8) -> None:
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def make_small_folder(folder: Path, n_png: int) -> Path:
    """PNGs with distinct intensities (distinct probabilities), a DICOM, and two error files."""
    (folder / "sub").mkdir(parents=True)
    for i in range(n_png):
        write_png(folder / ("sub" if i % 2 else "") / f"img{i:03d}.png", 255 * i // n_png)
    write_png(folder / ODD_NAME, 77)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    (folder / "empty.dcm").touch()
    (folder / "sub" / "notes.dcm").write_text("not an image\n")
    return folder


def wait_for(condition: Callable[[], bool], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def child_pids(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task").iterdir()
    return [int(child) for task in tasks for child in (task / "children").read_text().split()]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is missing


# --- a real mixed folder, scored once for several tests -------------------------------------------


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("mixed") / "input"
    shutil.copytree(CORPUS, folder / "corpus")
    shutil.copytree(BROKEN, folder / "broken")
    (folder / "pydicom").mkdir()
    for name in PYDICOM_FILES:
        shutil.copy(pydicom.data.get_testdata_file(name), folder / "pydicom" / name)
    misc = folder / "misc"
    misc.mkdir()
    (misc / "zero.dcm").touch()
    (misc / "text.dcm").write_text("patient notes, not DICOM\n")
    (misc / ".hidden").write_bytes(b"\x00\x01junk")
    write_png(misc / "gray.png", 200, size=32)
    write_png(misc / ODD_NAME, 50, size=16)
    for path in folder.rglob("*"):
        path.chmod(0o444 if path.is_file() else 0o555)  # scoring must only read
    before = tree_digest(folder)
    out = folder.parent / "out" / "scores.csv"
    summary = score_folder(folder, MeanPredictor(), out, workers=2, batch_size=4, progress=False)
    return {"folder": folder, "out": out, "summary": summary, "before": before}


def test_every_file_has_exactly_one_row_and_the_contract_holds(mixed: dict) -> None:
    result = check_scores(mixed["folder"], mixed["out"])
    assert result.returncode == 0, result.stdout
    rows = read_rows(mixed["out"])
    assert [row["path"] for row in rows] == list(crawl(mixed["folder"]))
    assert list(rows[0]) == [
        "path",
        "status",
        "error",
        "sop_instance_uid",
        "modality",
        "body_part",
        "in_scope",
        "ood_score",
        "ood_percentile",
        "intensity_mean",
        "intensity_std",
        "prob_low",
        "prob_high",
    ]
    summary = mixed["summary"]
    assert (summary.n_files, summary.n_resumed) == (len(rows), 0)
    assert summary.n_error == sum(row["status"] == "error" for row in rows) > 0
    assert summary.exit_code == 1
    assert f"{summary.n_error} errors" in str(summary)


def test_readable_files_score_and_unreadable_files_are_error_rows(mixed: dict) -> None:
    table = by_path(mixed["out"])
    for name in os.listdir(CORPUS):
        row = table[f"corpus/{name}"]
        assert (row["status"], row["error"]) == ("ok", ""), name
        assert row["sop_instance_uid"], name
    errors = [f"broken/{name}" for name in UNDECODABLE] + [
        "pydicom/MR_truncated.dcm",
        "pydicom/rtplan.dcm",
        "misc/zero.dcm",
        "misc/text.dcm",
        "misc/.hidden",
    ]
    for path in errors:
        assert table[path]["status"] == "error", path
        assert table[path]["error"].strip() and "\n" not in table[path]["error"], path
        assert table[path]["prob_low"] == table[path]["prob_high"] == "", path
    assert table["misc/gray.png"]["sop_instance_uid"] == ""


def test_probabilities_are_exactly_the_predictors(mixed: dict) -> None:
    table = by_path(mixed["out"])
    for rel in [
        "pydicom/CT_small.dcm",
        "corpus/emri_small.dcm",
        "misc/gray.png",
        f"misc/{ODD_NAME}",
    ]:
        row = table[rel]
        got = [np.float32(row["prob_low"]), np.float32(row["prob_high"])]
        assert got == expected_probs(mixed["folder"] / rel), rel
    ct = pydicom.dcmread(mixed["folder"] / "pydicom" / "CT_small.dcm", stop_before_pixels=True)
    assert table["pydicom/CT_small.dcm"]["sop_instance_uid"] == ct.SOPInstanceUID


def test_intensity_columns_are_the_model_inputs_mean_and_sd(mixed: dict) -> None:
    table = by_path(mixed["out"])
    for rel in ["pydicom/CT_small.dcm", "corpus/emri_small.dcm", "misc/gray.png"]:
        image = load_image(mixed["folder"] / rel, window="dicom", frames="first")
        pixels = model_pixels(image.pixels, MeanPredictor.image_size, MeanPredictor.channels)
        row = table[rel]
        assert float(row["intensity_mean"]) == pytest.approx(float(np.mean(pixels)), abs=1e-6)
        assert float(row["intensity_std"]) == pytest.approx(float(np.std(pixels)), abs=1e-6)
    assert float(table["corpus/emri_small.dcm"]["intensity_std"]) > 0.05  # a real image
    broken = table[f"broken/{UNDECODABLE[0]}"]
    assert broken["intensity_mean"] == broken["intensity_std"] == ""


def test_inputs_are_untouched_and_only_the_output_is_left(mixed: dict) -> None:
    assert tree_digest(mixed["folder"]) == mixed["before"]
    assert os.listdir(mixed["out"].parent) == ["scores.csv"]


# --- crawl and arguments --------------------------------------------------------------------------


def test_crawl_sees_what_os_walk_sees_in_sorted_order(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=3)
    (folder / ".hidden_dir").mkdir()
    (folder / ".hidden_dir" / ".x").write_bytes(b"")
    (folder / "linked_dir").symlink_to(folder / "sub")  # os.walk does not follow it
    (folder / "linked.png").symlink_to(folder / "img000.png")
    (folder / "dangling").symlink_to(tmp_path / "missing")
    walked = {
        os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs
    }
    paths = list(crawl(folder))
    assert set(paths) == walked and len(paths) == len(walked)
    assert paths == list(crawl(folder))
    assert paths.index("ct.dcm") < paths.index("sub/img001.png") < paths.index("sub/notes.dcm")


def test_output_inside_the_input_folder_is_refused(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=1)
    with pytest.raises(MedtransferError, match="inside the input folder"):
        score_folder(folder, MeanPredictor(), folder / "sub" / "scores.csv", progress=False)
    assert not list(folder.rglob("scores.csv*"))


def test_in_process_and_pool_decoding_give_the_same_rows(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=9)
    pool = score_folder(folder, MeanPredictor(), tmp_path / "a.csv", workers=2, progress=False)
    alone = score_folder(folder, MeanPredictor(), tmp_path / "b.csv", workers=0, progress=False)
    assert read_rows(tmp_path / "a.csv") == read_rows(tmp_path / "b.csv")
    assert (pool.n_ok, pool.n_error) == (alone.n_ok, alone.n_error) == (11, 2)
    assert check_scores(folder, tmp_path / "a.csv").returncode == 0


# --- resume ---------------------------------------------------------------------------------------


def test_resume_after_sigkill_gives_the_uninterrupted_rows(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=60)
    reference = tmp_path / "reference.csv"
    score_folder(folder, MeanPredictor(), reference, workers=0, progress=False)
    out = tmp_path / "out" / "scores.csv"
    partial = out.with_name("scores.csv.partial")
    script = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from test_scoring import MeanPredictor\n"
        "from medtransfer.scoring import score_folder\n"
        f"score_folder({str(folder)!r}, MeanPredictor(delay_per_image=0.05), {str(out)!r},"
        " workers=1, batch_size=2, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        wait_for(lambda: partial.exists() and partial.read_text().count("\n") > 10)
        assert proc.poll() is None, "scoring ended before it could be killed"
        workers = child_pids(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not any(map(is_running, workers)))  # no orphaned decode workers
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert workers and not out.exists()
    summary = score_folder(folder, MeanPredictor(), out, workers=0, resume=True, progress=False)
    assert 10 <= summary.n_resumed < summary.n_files
    assert read_rows(out) == read_rows(reference)
    assert not partial.exists()


def test_resume_after_a_write_torn_at_any_byte_gives_the_full_rows(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", 100 + i)
    write_png(folder / ODD_NAME, 7)
    reference = tmp_path / "reference.csv"
    score_folder(folder, MeanPredictor(), reference, workers=0, progress=False)
    data = reference.read_bytes()
    expected = read_rows(reference)
    out = tmp_path / "scores.csv"
    partial = tmp_path / "scores.csv.partial"
    for cut in range(len(data)):
        partial.write_bytes(data[:cut])
        score_folder(folder, MeanPredictor(), out, workers=0, resume=True, progress=False)
        assert read_rows(out) == expected, f"torn at byte {cut}: {data[:cut]!r}"
        out.unlink()


def test_resume_from_a_finished_output_scores_only_new_files(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=4)
    out = tmp_path / "scores.csv"
    first = score_folder(folder, MeanPredictor(), out, workers=0, progress=False)
    write_png(folder / "new.png", 9)
    (folder / "img000.png").unlink()
    second = score_folder(folder, MeanPredictor(), out, workers=0, resume=True, progress=False)
    assert (second.n_files, second.n_resumed) == (first.n_files, first.n_files - 1)
    assert by_path(out)["new.png"]["status"] == "ok"
    assert check_scores(folder, out).returncode == 0


def test_resume_refuses_an_output_written_for_other_classes(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=1)
    out = tmp_path / "scores.csv"
    score_folder(folder, MeanPredictor(), out, workers=0, progress=False)
    other = MeanPredictor()
    other.class_names = ["normal", "abnormal"]
    with pytest.raises(MedtransferError, match="cannot resume"):
        score_folder(folder, other, out, workers=0, resume=True, progress=False)


# --- failures that must cost one row, never the batch ---------------------------------------------


class KillsTheWorkers(MeanPredictor):
    """Simulates the OOM killer hitting the decode workers while files are in flight. All of them:
    a survivor could finish every queued file before the pool notices the death."""

    killed = False

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        if not self.killed:
            self.killed = True
            workers = multiprocessing.active_children()
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
            for worker in workers:
                worker.join()
        return super().predict(images)


class _ExitOnUnpickle:
    """Passed as the window, it kills every worker that receives a file: each file is a culprit."""

    def __reduce__(self) -> tuple:
        return os._exit, (70,)


def test_killed_workers_are_replaced_and_no_file_is_lost(tmp_path: Path) -> None:
    folder = make_small_folder(tmp_path / "in", n_png=20)
    summary = score_folder(
        folder, KillsTheWorkers(), tmp_path / "a.csv", workers=2, batch_size=2, progress=False
    )
    score_folder(folder, MeanPredictor(), tmp_path / "b.csv", workers=0, progress=False)
    assert read_rows(tmp_path / "a.csv") == read_rows(tmp_path / "b.csv")
    assert summary.n_error == 2


def test_a_file_that_kills_its_worker_becomes_an_error_row(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        write_png(folder / f"{i}.png", i)
    predictor = MeanPredictor()
    predictor.window = _ExitOnUnpickle()
    summary = score_folder(folder, predictor, tmp_path / "s.csv", workers=2, progress=False)
    rows = read_rows(tmp_path / "s.csv")
    assert [(row["status"], row["error"]) for row in rows] == [("error", WORKER_DIED)] * 3
    assert summary.exit_code == 1


class FussyPredictor(MeanPredictor):
    """Fails on one grey level (100/255) and returns NaN for very dark images."""

    def predict(self, images: list[np.ndarray]) -> np.ndarray:
        if any(np.allclose(image, 100 / 255) for image in images):
            raise ValueError("cannot take this image")
        probs = super().predict(images)
        probs[[float(np.mean(image)) < 0.01 for image in images]] = np.nan
        return probs


def test_a_prediction_failure_costs_only_that_files_row(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(1, 6):
        write_png(folder / f"{i}.png", 40 * i)
    write_png(folder / "odd.png", 100, size=16)
    write_png(folder / "black.png", 0)
    score_folder(folder, FussyPredictor(), tmp_path / "s.csv", workers=0, progress=False)
    table = by_path(tmp_path / "s.csv")
    assert table["odd.png"]["error"].startswith("prediction failed: ValueError at ")
    assert "not finite" in table["black.png"]["error"]
    for i in range(1, 6):
        row = table[f"{i}.png"]
        assert np.float32(row["prob_high"]) == expected_probs(folder / f"{i}.png")[1]


def test_importing_scoring_does_not_import_tensorflow() -> None:
    code = "import sys, medtransfer.scoring; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_parquet_output_holds_the_csv_rows_typed_and_resumes(tmp_path: Path) -> None:
    import pandas as pd

    folder = make_small_folder(tmp_path / "in", n_png=6)
    csv_out, parquet_out = tmp_path / "scores.csv", tmp_path / "scores.parquet"
    score_folder(folder, MeanPredictor(), csv_out, workers=0, progress=False)
    summary = score_folder(folder, MeanPredictor(), parquet_out, workers=0, progress=False)
    table = pd.read_parquet(parquet_out)
    expected = pd.read_csv(csv_out, dtype=str, keep_default_na=False)
    assert table["prob_high"].dtype == np.float32 and summary.n_error == 2
    assert table["path"].tolist() == expected["path"].tolist()
    assert table["status"].tolist() == expected["status"].tolist()
    for column in ("prob_low", "prob_high"):  # the same float32 values; errors are nulls
        want = pd.to_numeric(expected[column].replace("", None)).astype(np.float32)
        assert np.array_equal(table[column].to_numpy(), want.to_numpy(), equal_nan=True)
    assert not (tmp_path / "scores.parquet.partial").exists()

    write_png(folder / "new.png", 9)
    again = score_folder(folder, MeanPredictor(), parquet_out, workers=0, resume=True,
                         progress=False)  # fmt: skip
    assert (again.n_files, again.n_resumed) == (summary.n_files + 1, summary.n_files)
    resumed = pd.read_parquet(parquet_out)
    assert (
        resumed.drop(index=resumed.index[resumed["path"] == "new.png"])
        .reset_index(drop=True)
        .equals(table)
    )


def test_decode_workers_send_model_size_images() -> None:
    """A 1955x1841 radiograph crosses the pipe as the model's 32x32 input, not 14 MB of pixels,
    and equals the model's own resize of the full image."""
    from medtransfer.scoring import Decoding, decode_file

    path = str(Path(__file__).resolve().parents[2] / "shared/data/dicom/corpus/RG1_J2KI.dcm")
    how = Decoding("dicom", "first", (32, 32), 1, (), None)
    decoded = decode_file(path, how)
    full = load_image(path).pixels
    assert full.shape == (1955, 1841) and decoded.pixels.shape == (32, 32, 1)
    np.testing.assert_array_equal(decoded.pixels, model_pixels(full, (32, 32), 1))
    assert decoded.sop_instance_uid == load_image(path).sop_instance_uid
