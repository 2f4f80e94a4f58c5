"""Scope checks and the training profile: what a model was trained on, and whether a scored
image is that kind of image. Real DICOM files from ../shared/data and pydicom's test files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medtransfer.data.profile import normalized_header, read_header, training_profile
from medtransfer.scope import IN_SCOPE, NO_HEADER, NO_PROFILE, scope_verdict

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
CHEST_CR = [str(CORPUS / name) for name in ("RG1_J2KI.dcm", "RG1_JLSN.dcm")]


def header(path: str | Path) -> dict[str, str]:
    return normalized_header(read_header(str(path)))


@pytest.fixture(scope="module")
def chest_profile() -> dict:
    images = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    return training_profile(CHEST_CR, images)


def test_profile_counts_what_the_training_images_are(chest_profile: dict) -> None:
    assert chest_profile["images"] == chest_profile["dicom_images"] == 2
    assert chest_profile["header"]["Modality"] == {"CR": 2}
    assert chest_profile["header"]["BodyPartExamined"] == {"CHEST": 2}
    assert chest_profile["header"]["PhotometricInterpretation"] == {"MONOCHROME1": 2}
    assert chest_profile["size"]["rows"] == [1955.0, 1955.0]
    assert chest_profile["intensity"]["pixels"][0] == pytest.approx(0.01, abs=0.01)
    assert chest_profile["intensity"]["pixels"][-1] == pytest.approx(0.99, abs=0.01)


def test_profile_keeps_each_images_mean_and_sd_for_drift_tests(chest_profile: dict) -> None:
    images = np.linspace(0, 1, 2 * 8 * 8, dtype=np.float32).reshape(2, 8, 8, 1)
    samples = chest_profile["intensity"]["samples"]
    np.testing.assert_allclose(samples["image_means"], images.mean(axis=(1, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(samples["image_stds"], images.std(axis=(1, 2, 3)), atol=1e-6)


def test_profile_samples_at_most_2000_images_in_float64_chunks() -> None:
    rng = np.random.default_rng(0)  # noise around distinct levels: every image has its own mean
    levels = np.linspace(0.1, 0.9, 2100, dtype=np.float32)[:, None, None, None]
    images = levels + rng.normal(0, 1e-4, (2100, 3, 3, 1)).astype(np.float32)
    samples = training_profile(["x.png"] * 2100, images)["intensity"]["samples"]
    assert len(samples["image_means"]) == len(samples["image_stds"]) == 2000
    means, stds = images.reshape(2100, -1).mean(axis=1), images.reshape(2100, -1).std(axis=1)
    rows = [np.flatnonzero(np.isclose(means, m, atol=1e-6))[0] for m in samples["image_means"]]
    assert len(set(rows)) == 2000  # distinct images, not repeats
    np.testing.assert_allclose(samples["image_stds"], stds[rows], atol=1e-6)


def test_profile_holds_no_paths_uids_or_patient_data(chest_profile: dict) -> None:
    text = json.dumps(chest_profile)
    for path in CHEST_CR:
        ds_header = read_header(path)
        assert Path(path).name not in text and str(Path(path).parent) not in text
        assert "SOPInstanceUID" not in text and "PatientID" not in text
        assert ds_header["Modality"] in text  # what it is, not whose it is


def test_files_without_a_header_make_an_empty_header_profile(tmp_path: Path) -> None:
    png = tmp_path / "a.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n")
    profile = training_profile([str(png), "archive.npz#train/0"], np.zeros((2, 4, 4, 1)))
    assert profile["dicom_images"] == 0 and profile["header"]["Modality"] == {}
    # a model trained without headers has nothing to hold a scored header against
    assert scope_verdict(header(CORPUS / "emri_small.dcm"), profile) == IN_SCOPE
    assert scope_verdict(None, profile) == IN_SCOPE


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("RG1_J2KI.dcm", IN_SCOPE),  # what it was trained on
        ("966_fixed.dcm", IN_SCOPE),  # DX chest: a flat-panel radiograph is the same kind as CR
        ("emri_small.dcm", "no: modality MR (trained on CR); body part HEAD (trained on CHEST)"),
        ("RG2_JLSL.dcm", "no: body part HIP (trained on CHEST)"),
        (
            "US1_J2KI.dcm",
            "no: modality US (trained on CR); colour image (YBR_ICT), trained on greyscale",
        ),
        ("MAROTECH_CT_JP2Lossy.dcm", "no: modality CT (trained on CR); localizer (scout) image"),
        (
            "vlut_04.dcm",
            "no: modality OT (trained on CR); secondary capture (a screenshot or a scanned image, "
            "not an acquisition)",
        ),
    ],
)
def test_verdicts_on_real_files(chest_profile: dict, name: str, expected: str) -> None:
    assert scope_verdict(header(CORPUS / name), chest_profile) == expected


def test_missing_tags_are_not_held_against_a_file(chest_profile: dict) -> None:
    ct = header(get_testdata_file("CT_small.dcm"))
    assert ct["Modality"] == "CT"
    bare = {**ct, "Modality": "", "BodyPartExamined": ""}
    assert scope_verdict(bare, chest_profile) == IN_SCOPE


def test_synonyms_and_unknowns(chest_profile: dict) -> None:
    thorax = {**header(CHEST_CR[0]), "BodyPartExamined": "THORAX"}
    assert scope_verdict(thorax, chest_profile) == IN_SCOPE
    assert scope_verdict(None, chest_profile) == NO_HEADER
    assert scope_verdict(header(CHEST_CR[0]), None) == NO_PROFILE


def test_a_model_trained_on_colour_or_scouts_accepts_them() -> None:
    profile = training_profile([str(CORPUS / "US1_J2KI.dcm")], np.zeros((1, 4, 4, 3)))
    assert scope_verdict(header(CORPUS / "US1_J2KI.dcm"), profile) == IN_SCOPE
    scouts = training_profile([str(CORPUS / "MAROTECH_CT_JP2Lossy.dcm")], np.zeros((1, 4, 4, 1)))
    assert scope_verdict(header(CORPUS / "MAROTECH_CT_JP2Lossy.dcm"), scouts) == IN_SCOPE


def test_hostile_training_files_cost_their_header_not_the_profile(tmp_path: Path) -> None:
    """Truncated, bit-flipped and garbage files, a FIFO (never opened: it would block) and a
    formula-looking name: each is an image without a header, and the profile is still made."""
    good = (CORPUS / "RG1_J2KI.dcm").read_bytes()
    files = {
        "truncated.dcm": good[:300],
        "garbage.dcm": b"DICM" * 50,
        "=HYPERLINK(1).dcm": good,
    }
    flipped = bytearray(good)
    flipped[140:180] = bytes(b ^ 0xFF for b in flipped[140:180])  # inside the File Meta
    files["flipped.dcm"] = bytes(flipped)
    paths = []
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    fifo = tmp_path / "pipe.dcm"
    os.mkfifo(fifo)
    paths.append(str(fifo))
    assert read_header(str(fifo)) is None and read_header(paths[0]) is None
    profile = training_profile(paths, np.zeros((len(paths), 4, 4, 1), np.float32))
    assert profile["images"] == 5
    assert profile["header"]["Modality"].get("CR", 0) == profile["dicom_images"] >= 1
    json.dumps(profile)  # plain JSON, whatever the files held
