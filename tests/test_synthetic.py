"""The demo dataset must look like a hospital export to the DICOM pipeline and carry a signal."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold

from medtransfer import synthetic

N_PATIENTS, IMAGES_PER_PATIENT, SEED = 120, 2, 0


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    start = time.perf_counter()
    path = synthetic.generate_dicom_dataset(tmp_path_factory.mktemp("synthetic"), seed=SEED)
    elapsed = time.perf_counter() - start
    assert elapsed < 30, f"default dataset took {elapsed:.1f} s"
    return path


@pytest.fixture(scope="module")
def manifest(manifest_path: Path) -> pd.DataFrame:
    return pd.read_csv(manifest_path)


@pytest.fixture(scope="module")
def files(manifest_path: Path, manifest: pd.DataFrame) -> dict[str, pydicom.Dataset]:
    return {p: pydicom.dcmread(manifest_path.parent / p) for p in manifest["path"]}


@pytest.fixture(scope="module")
def displayed(files: dict[str, pydicom.Dataset]) -> dict[str, np.ndarray]:
    return {p: display(ds) for p, ds in files.items()}


def display(ds: pydicom.Dataset) -> np.ndarray:
    """Standard grayscale pipeline: Modality LUT -> VOI window -> MONOCHROME1 inversion -> [0, 1].

    pydicom's windowing maps onto the rescaled range of the stored bit depth, so that range is
    what [0, 1] is taken from.
    """
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    low = float(ds.RescaleIntercept)
    high = (2**ds.BitsStored - 1) * float(ds.RescaleSlope) + low
    image = (values - low) / (high - low)
    return 1 - image if ds.PhotometricInterpretation == "MONOCHROME1" else image


def test_manifest_lists_every_file_once_with_consistent_columns(
    manifest_path: Path, manifest: pd.DataFrame, files: dict[str, pydicom.Dataset]
) -> None:
    root = manifest_path.parent
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*.dcm")}
    assert list(manifest.columns) == ["path", "label", "patient_id", "site"]
    assert manifest["path"].is_unique
    assert set(manifest["path"]) == on_disk
    assert len(manifest) == N_PATIENTS * IMAGES_PER_PATIENT
    assert set(manifest["label"]) == set(synthetic.LABELS)
    assert set(manifest["site"]) == {"site_a", "site_b"}
    per_patient = manifest.groupby("patient_id")[["label", "site"]].nunique()
    assert (per_patient == 1).all().all(), "label and site must be per patient"
    for row in manifest.itertuples():
        ds = files[row.path]
        folder = f"case{int(row.patient_id.removeprefix('QS-')):04d}"
        assert row.path.split("/")[:3] == ["dicom", row.site, folder]
        assert row.patient_id not in row.path, "no PatientID in file paths"
        assert ds.PatientID == row.patient_id
        assert ds.ManufacturerModelName == _site(row.site).model


def test_every_file_decodes_with_the_site_geometry(files: dict[str, pydicom.Dataset]) -> None:
    for path, ds in files.items():
        site = _site(path.split("/")[1])
        pixels = ds.pixel_array
        assert pixels.shape == (site.size, site.size) == (ds.Rows, ds.Columns)
        assert pixels.dtype == np.uint16
        assert pixels.max() <= site.max_stored
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (
            16,
            site.bits_stored,
            site.bits_stored - 1,
        )


def test_labels_balanced_within_each_site(manifest: pd.DataFrame) -> None:
    patients = manifest.drop_duplicates("patient_id")
    counts = pd.crosstab(patients["site"], patients["label"])
    assert counts.shape == (2, 2)
    assert (abs(counts["normal"] - counts["finding"]) <= 1).all(), counts


def test_every_encoding_and_polarity_appears(files: dict[str, pydicom.Dataset]) -> None:
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in files.values()}
    polarities = {ds.PhotometricInterpretation for ds in files.values()}
    assert syntaxes == set(synthetic.ENCODINGS)
    assert polarities == {"MONOCHROME1", "MONOCHROME2"}


def test_files_are_valid_dx_objects_with_phi_shaped_identifiers(
    files: dict[str, pydicom.Dataset],
) -> None:
    sop_uids = [ds.SOPInstanceUID for ds in files.values()]
    assert len(set(sop_uids)) == len(sop_uids)
    for ds in files.values():
        meta = ds.file_meta
        assert (
            meta.MediaStorageSOPClassUID
            == ds.SOPClassUID
            == pydicom.uid.DigitalXRayImageStorageForPresentation
        )
        assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert (ds.Modality, ds.BodyPartExamined, ds.ViewPosition) == ("DX", "CHEST", "PA")
        assert (ds.SamplesPerPixel, ds.PixelRepresentation) == (1, 0)
        assert ds.StudyInstanceUID and ds.SeriesInstanceUID
        assert str(ds.PatientName) == f"SYNTHETIC^PATIENT{ds.PatientID[3:]}"
        assert len(ds.PatientBirthDate) == 8
        inverse = ds.PhotometricInterpretation == "MONOCHROME1"
        assert ds.PresentationLUTShape == ("INVERSE" if inverse else "IDENTITY")


def test_same_picture_for_every_encoding_and_polarity() -> None:
    plan = next(p for p in synthetic._plan_dataset(4, 1, SEED) if p.label == "finding")
    for site in synthetic.SITES:
        plan = dataclasses.replace(plan, site=site)
        stored = synthetic._stored_values(synthetic._render_display(plan), site, plan.pixel_seed)
        pictures = []
        for encoding in synthetic.ENCODINGS:
            for polarity in synthetic.POLARITIES:
                variant = dataclasses.replace(plan, encoding=encoding, polarity=polarity)
                buffer = io.BytesIO()
                synthetic._to_dataset(variant, stored, SEED).save_as(
                    buffer, enforce_file_format=True
                )
                ds = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
                assert ds.file_meta.TransferSyntaxUID == encoding
                pictures.append(display(ds))
        for picture in pictures[1:]:
            np.testing.assert_allclose(picture, pictures[0], atol=1e-9)
        assert 0.2 < pictures[0].mean() < 0.8, "window should cover the useful range"


def test_nodule_is_brighter_than_its_surroundings(displayed: dict[str, np.ndarray]) -> None:
    plans = synthetic._plan_dataset(N_PATIENTS, IMAGES_PER_PATIENT, SEED)
    findings = [p for p in plans if p.nodule is not None]
    assert {p.label for p in findings} == {"finding"}
    assert len(findings) == sum(p.label == "finding" for p in plans)
    for plan in findings:
        image = displayed[plan.relative_path]
        row, col, radius = plan.nodule.in_pixels(image.shape[0])
        assert 0.06 * image.shape[0] <= radius <= 0.12 * image.shape[0]
        rows, cols = np.indices(image.shape)
        distance = np.hypot(rows - row, cols - col)
        core = image[distance < 0.5 * radius].mean()
        ring = np.median(image[(distance > 1.3 * radius) & (distance < 2 * radius)])
        assert core - ring > 0.05, f"{plan.relative_path}: core {core:.3f} vs ring {ring:.3f}"


def test_metadata_does_not_reveal_the_label(
    manifest: pd.DataFrame, files: dict[str, pydicom.Dataset]
) -> None:
    """Each tag with few distinct values (syntax, polarity, site, sex...) occurs in both classes."""
    values: dict[str, pd.Series] = {}
    for row in manifest.itertuples():
        ds = files[row.path]
        elements = [*ds.file_meta, *(e for e in ds if e.keyword != "PixelData")]
        for element in elements:
            values.setdefault(element.keyword, pd.Series(dtype=object))[row.path] = str(
                element.value
            )
    labels = manifest.set_index("path")["label"]
    checked = 0
    for keyword, column in values.items():
        if column.nunique() <= 10:
            checked += 1
            by_value = pd.crosstab(column, labels.loc[column.index])
            assert (by_value > 0).all().all(), f"{keyword} separates labels:\n{by_value}"
    assert checked >= 20


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(tmp_path: Path) -> None:
    def generate(name: str, seed: int) -> dict[str, bytes]:
        manifest = synthetic.generate_dicom_dataset(
            tmp_path / name, n_patients=4, images_per_patient=2, seed=seed
        )
        return {
            p.relative_to(manifest.parent).as_posix(): p.read_bytes()
            for p in manifest.parent.rglob("*")
            if p.is_file()
        }

    first, again, other = generate("a", 0), generate("b", 0), generate("c", 1)
    assert first == again
    assert sum(k.endswith(".dcm") for k in first) == 8
    assert set(first.values()).isdisjoint(other.values())


def test_linear_model_on_thumbnails_is_better_than_chance_but_not_perfect(
    manifest: pd.DataFrame, displayed: dict[str, np.ndarray]
) -> None:
    """A nodule at a random place is not a linear feature; a near-perfect score means a shortcut."""
    thumbnails = np.stack([_thumbnail(displayed[p]) for p in manifest["path"]])
    target = (manifest["label"] == "finding").to_numpy()
    scores = np.zeros(len(manifest))
    for train, test in GroupKFold(n_splits=5).split(thumbnails, target, manifest["patient_id"]):
        model = LogisticRegression(C=1.0, max_iter=5000).fit(thumbnails[train], target[train])
        scores[test] = model.predict_proba(thumbnails[test])[:, 1]
    auroc = roc_auc_score(target, scores)
    print(f"logistic regression on 32x32 thumbnails: out-of-fold AUROC {auroc:.3f}")
    assert 0.6 < auroc < 0.97


def test_importing_the_generator_does_not_import_tensorflow() -> None:
    code = (
        "import sys, medtransfer.synthetic; "
        "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def _thumbnail(image: np.ndarray) -> np.ndarray:
    block = image.shape[0] // 32
    return image.reshape(32, block, 32, block).mean(axis=(1, 3)).ravel()


def _site(name: str) -> synthetic.Site:
    return next(s for s in synthetic.SITES if s.name == name)
