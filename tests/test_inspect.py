"""``medtransfer inspect``: one QA row per file, real decoding, safe tags only, honest exit codes.

Runs on the real DICOM corpus and broken files of ../shared/data plus pydicom's non-image objects
(DICOMDIR, SR, RT Plan), copied into a temporary folder; no TensorFlow is needed.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from PIL import Image

from medtransfer import cli
from medtransfer.folder_pool import crawl
from medtransfer.inspect import COLUMNS, inspect_folder

DICOM = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom"
CORPUS, BROKEN, MANIFEST = DICOM / "corpus", DICOM / "broken", DICOM / "MANIFEST.csv"
SKIPPED = {
    "pydicom/DICOMDIR": "Media Storage Directory",
    "pydicom/test-SR.dcm": "SR",
    "pydicom/rtplan.dcm": "RT Plan",
}
NIH_PATIENT_ID = "Covid0000"


def read_table(out_csv: Path) -> dict[str, dict[str, str]]:
    with open(out_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    table = {row["path"]: row for row in rows}
    assert len(table) == len(rows), "a path appears more than once"
    return table


def write_png(path: Path, value: int = 120) -> None:
    Image.fromarray(np.full((16, 16), value, dtype=np.uint8)).save(path)


def tree_digest(folder: Path) -> dict[str, str]:
    return {rel: hashlib.sha256((folder / rel).read_bytes()).hexdigest() for rel in crawl(folder)}


def build_mixed_folder(folder: Path) -> Path:
    shutil.copytree(CORPUS, folder / "corpus")
    shutil.copytree(BROKEN, folder / "broken")
    (folder / "pydicom").mkdir()
    for name in ("rtplan.dcm", "test-SR.dcm", "CT_small.dcm"):
        shutil.copy(pydicom.data.get_testdata_file(name), folder / "pydicom" / name)
    ct_small = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
    shutil.copy(ct_small.parent / "dicomdirtests" / "DICOMDIR", folder / "pydicom" / "DICOMDIR")
    (folder / "misc").mkdir()
    write_png(folder / "misc" / "gray.png")
    (folder / "misc" / "notes.dcm").write_text("patient notes, not DICOM\n")
    return folder


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The mixed folder inspected once through the CLI (real spawn pool), stdout captured."""
    folder = build_mixed_folder(tmp_path_factory.mktemp("mixed") / "input")
    before = tree_digest(folder)
    out = folder.parent / "out" / "qa.csv"
    argv = ["inspect", str(folder), "--out", str(out), "--workers", "2", "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "medtransfer.cli", *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    return {"folder": folder, "out": out, "result": result, "before": before}


def test_every_file_has_exactly_one_row_in_crawl_order(mixed: dict) -> None:
    with open(mixed["out"], newline="", encoding="utf-8") as handle:
        rows = list(csv.reader(handle))
    assert tuple(rows[0]) == COLUMNS
    assert [row[0] for row in rows[1:]] == list(crawl(mixed["folder"]))
    assert len(rows) - 1 == 39 + 6 + 4 + 2


def test_corpus_rows_decode_and_match_the_manifest(mixed: dict) -> None:
    table = read_table(mixed["out"])
    with open(MANIFEST, newline="", encoding="utf-8") as handle:
        manifest = [row for row in csv.DictReader(handle) if row["file"].startswith("corpus/")]
    assert len(manifest) == 39
    for expected in manifest:
        row = table[expected["file"]]
        assert (row["status"], row["reason"]) == ("ok", ""), expected["file"]
        got = [row[c] for c in ("rows", "columns", "modality", "photometric_interpretation")]
        tags = ("Rows", "Columns", "Modality", "PhotometricInterpretation")
        assert got == [expected[t] for t in tags], expected["file"]
        assert row["transfer_syntax"] == expected["transfer_syntax"].split(" ")[0]
        assert row["sop_class"] and row["frames"] and row["window_source"], expected["file"]


def test_window_columns_are_the_one_the_pipeline_used(mixed: dict) -> None:
    ct = read_table(mixed["out"])["pydicom/CT_small.dcm"]
    assert ct["modality"] == "CT" and ct["manufacturer"] == "GE MEDICAL SYSTEMS"
    assert ct["window_source"] in ("file", "minmax", "minmax_fallback", "voi_lut")
    if ct["window_source"] != "voi_lut":
        assert float(ct["window_width"]) > 0


def test_non_image_dicom_objects_are_skipped_with_a_reason(mixed: dict) -> None:
    table = read_table(mixed["out"])
    for path, kind in SKIPPED.items():
        row = table[path]
        assert row["status"] == "skipped", path
        assert "no image" in row["reason"] and kind in row["reason"], row["reason"]
        assert row["sop_class"], path  # what the object is, even without pixels


def test_broken_files_are_error_rows_with_their_header_tags(mixed: dict) -> None:
    table = read_table(mixed["out"])
    for name in os.listdir(BROKEN):
        row = table[f"broken/{name}"]
        assert row["status"] == "error" and row["reason"].strip(), name
        assert "\n" not in row["reason"], name
    assert table["broken/966.dcm"]["rows"] == "2128"  # the header still tells what failed
    assert table["broken/not_dicom_jpeg_B1.JPG"]["modality"] == ""


def test_images_are_ok_and_other_files_are_errors(mixed: dict) -> None:
    table = read_table(mixed["out"])
    png = table["misc/gray.png"]
    assert (png["status"], png["reason"]) == ("ok", "")
    assert all(png[column] == "" for column in COLUMNS[3:])
    notes = table["misc/notes.dcm"]
    assert notes["status"] == "error"
    assert notes["reason"].startswith("not a DICOM file or an image")


def patient_values() -> set[str]:
    """Patient names and IDs of the corpus that are distinctive enough to search for."""
    values = {NIH_PATIENT_ID}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in CORPUS.iterdir():
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            for keyword in ("PatientName", "PatientID"):
                value = str(ds.get(keyword) or "").strip()
                if len(value) >= 6 and any(c.isalpha() for c in value):
                    values.add(value)
    return values


def test_no_patient_identifiers_in_the_table_or_the_output(mixed: dict) -> None:
    with open(mixed["out"], newline="", encoding="utf-8") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row[1:]]  # path aside
    text = "\n".join(cells) + mixed["result"].stdout + mixed["result"].stderr
    leaked = [value for value in patient_values() if value in text]
    assert not leaked
    assert NIH_PATIENT_ID not in mixed["out"].read_text(encoding="utf-8")


def test_exit_code_1_and_a_summary_when_files_fail(mixed: dict) -> None:
    result = mixed["result"]
    assert result.returncode == 1, result.stderr
    table = read_table(mixed["out"])
    n_error = sum(row["status"] == "error" for row in table.values())
    assert f"{len(table)} files: {len(table) - n_error - 3} ok, {n_error} error, 3 skipped" in (
        result.stdout
    )
    for part in ("by modality: ", "by transfer syntax: ", "top error reasons:", "files/s"):
        assert part in result.stdout, part


def test_inputs_are_untouched_and_only_the_table_is_written(mixed: dict) -> None:
    assert tree_digest(mixed["folder"]) == mixed["before"]
    assert os.listdir(mixed["out"].parent) == ["qa.csv"]


# --- small folders --------------------------------------------------------------------------------


def small_folder(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    shutil.copy(pydicom.data.get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(CORPUS / "emri_small_RLE.dcm", folder / "sub" / "mr.dcm")
    for i in range(3):
        write_png(folder / "sub" / f"{i}.png", 40 * i)
    return folder


def test_a_clean_folder_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = small_folder(tmp_path / "in")
    code = cli.main(["inspect", str(folder), "--out", str(tmp_path / "qa.csv"), "--no-progress"])
    assert code == 0
    assert "5 files: 5 ok, 0 error, 0 skipped" in capsys.readouterr().out


def test_bad_arguments_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    folder = small_folder(tmp_path / "in")
    inside = ["inspect", str(folder), "--out", str(folder / "qa.csv"), "--no-progress"]
    assert cli.main(inside) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert cli.main(["inspect", str(tmp_path / "missing"), "--out", str(tmp_path / "a.csv")]) == 2
    assert cli.main(["inspect", str(folder), "--out", str(tmp_path / "b.csv"), "--workers=-1"]) == 2
    assert not list(tmp_path.glob("*.csv*"))


def test_pool_and_in_process_give_the_same_table(tmp_path: Path) -> None:
    folder = small_folder(tmp_path / "in")
    (folder / "sub" / "notes.dcm").write_text("not an image\n")
    pool = inspect_folder(folder, tmp_path / "a.csv", workers=2, progress=False)
    alone = inspect_folder(folder, tmp_path / "b.csv", workers=0, progress=False)
    assert read_table(tmp_path / "a.csv") == read_table(tmp_path / "b.csv")
    assert (pool.by_status, pool.exit_code) == (alone.by_status, 1)


def test_resume_inspects_only_new_files(tmp_path: Path) -> None:
    folder = small_folder(tmp_path / "in")
    out = tmp_path / "qa.csv"
    first = inspect_folder(folder, out, workers=0, progress=False)
    write_png(folder / "new.png")
    (folder / "sub" / "0.png").unlink()
    second = inspect_folder(folder, out, workers=0, resume=True, progress=False)
    assert (second.n_files, second.n_resumed) == (first.n_files, first.n_files - 1)
    assert second.by_modality == first.by_modality
    table = read_table(out)
    # Kept rows come first and new files after them, so compare as sets.
    assert sorted(table) == sorted(crawl(folder)) and table["new.png"]["status"] == "ok"


def test_importing_inspect_does_not_import_tensorflow() -> None:
    code = "import sys, medtransfer.inspect; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
