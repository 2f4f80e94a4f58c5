"""Manifests from npz, CSV and folders: exact counts on real MedMNIST files, patient-level
splits without leakage, and spec errors for data that does not match the spec."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image

from medtransfer.data.manifest import build_manifest, fingerprint, targets
from medtransfer.errors import SpecError
from medtransfer.privacy import pseudonym
from medtransfer.spec import spec_from_dict

from .conftest import SHARED_DATA


def npz_spec(name: str, task: str, classes: list[str]):
    path = SHARED_DATA / "medmnist" / f"{name}.npz"
    return spec_from_dict(
        {
            "name": name,
            "task": task,
            "classes": classes,
            "data": {"format": "npz", "path": str(path)},
        }
    )


def test_breastmnist_uses_the_files_own_splits_and_1d_labels():
    spec = npz_spec("breastmnist", "binary", ["malignant", "normal_or_benign"])
    df = build_manifest(spec)
    assert df["split"].value_counts().to_dict() == {"train": 546, "test": 156, "val": 78}
    y = targets(df, spec.classes)
    counts = {s: y[(df["split"] == s).to_numpy()].sum(0).tolist() for s in ("train", "val", "test")}
    assert counts == {"train": [147, 399], "val": [21, 57], "test": [42, 114]}
    with np.load(spec.data.path) as archive:
        assert np.array_equal(
            np.argmax(y[df["split"] == "test"], 1), archive["test_labels"].ravel()
        )


def test_retinamnist_is_five_class_one_hot():
    spec = npz_spec("retinamnist", "multiclass", [f"g{i}" for i in range(5)])
    df = build_manifest(spec)
    y = targets(df, spec.classes)
    assert y.shape == (1600, 5)
    assert np.all(y.sum(1) == 1)
    assert y[(df["split"] == "test").to_numpy()].sum(0).tolist() == [174, 46, 92, 68, 20]


def test_npz_labels_beyond_the_class_list_are_a_spec_error():
    spec = npz_spec("retinamnist", "multiclass", ["g0", "g1", "g2"])
    with pytest.raises(SpecError, match=r"classes: label values \[3, 4\] have no class"):
        build_manifest(spec)


def make_csv_dataset(tmp_path, n_patients=40, per_patient=3):
    rows = []
    for p in range(n_patients):
        label = "pos" if p % 2 else "neg"
        for i in range(per_patient):
            name = f"img_{p}_{i}.png"
            Image.fromarray(np.full((8, 8), p, np.uint8)).save(tmp_path / name)
            rows.append({"file": name, "dx": label, "pid": f"PAT{p:03d}", "hospital": f"h{p % 3}"})
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    return tmp_path / "m.csv"


def csv_spec(path, **data):
    return spec_from_dict(
        {
            "name": "csv",
            "task": "binary",
            "classes": ["neg", "pos"],
            "data": {
                "format": "manifest",
                "path": str(path),
                "image_column": "file",
                "label_columns": ["dx"],
                "patient_column": "pid",
                **data,
            },
            "split": {"val": 0.25, "test": 0.25, "seed": 3},
        }
    )


def test_csv_split_keeps_each_patient_in_one_split_and_stratifies(tmp_path):
    df = build_manifest(csv_spec(make_csv_dataset(tmp_path), site_column="hospital"))
    assert len(df) == 120
    assert df.groupby("patient")["split"].nunique().max() == 1
    patients = df.drop_duplicates("patient")
    per_split = patients.groupby(["split", "label"]).size().unstack()
    assert per_split.loc["test"].tolist() == [5, 5]
    assert per_split.loc["val"].tolist() == [5, 5]
    assert per_split.loc["train"].tolist() == [10, 10]
    assert set(df["site"]) == {"h0", "h1", "h2"}


def test_csv_patient_ids_never_reach_the_manifest(tmp_path):
    df = build_manifest(csv_spec(make_csv_dataset(tmp_path)))
    assert not df.astype(str).apply(lambda c: c.str.contains("PAT0")).any().any()
    assert df["patient"].iloc[0] == pseudonym("PAT000", "medtransfer:csv")


def test_split_is_reproducible_and_seed_dependent(tmp_path):
    path = make_csv_dataset(tmp_path)
    a = build_manifest(csv_spec(path))["split"].tolist()
    assert a == build_manifest(csv_spec(path))["split"].tolist()
    other = csv_spec(path).with_overrides(split={"seed": 4})
    assert a != build_manifest(other)["split"].tolist()


def test_csv_errors_name_the_problem(tmp_path):
    path = make_csv_dataset(tmp_path, n_patients=4)
    with pytest.raises(SpecError, match=r"column\(s\) \['site'\] not in m\.csv"):
        build_manifest(csv_spec(path, site_column="site"))
    table = pd.read_csv(path)
    table.loc[2, "dx"] = "maybe"
    table.to_csv(path, index=False)
    with pytest.raises(SpecError, match=r"label value\(s\) \['maybe'\] in column 'dx'"):
        build_manifest(csv_spec(path))
    table.loc[2, "dx"] = "neg"
    table.loc[0, "file"] = "gone.png"
    table.to_csv(path, index=False)
    with pytest.raises(SpecError, match=r"1 image file.*missing.*gone\.png"):
        build_manifest(csv_spec(path))


def test_multilabel_from_separated_column(tmp_path):
    labels = pd.read_csv(SHARED_DATA / "cxr_png" / "labels.csv")
    column = "labels"
    tokens = sorted({t for v in labels[column].fillna("") for t in v.split("|") if t})
    classes = [t for t in tokens if t != "No Finding"]
    labels[column] = labels[column].str.replace("No Finding", "", regex=False)
    labels.to_csv(tmp_path / "labels.csv", index=False)
    for name in labels[labels.columns[0]]:
        (tmp_path / name).write_bytes((SHARED_DATA / "cxr_png" / name).read_bytes())
    spec = spec_from_dict(
        {
            "name": "cxr",
            "task": "multilabel",
            "classes": classes,
            "data": {
                "format": "manifest",
                "path": str(tmp_path / "labels.csv"),
                "image_column": labels.columns[0],
                "label_columns": [column],
            },
            "split": {"val": 0.3, "test": 0.3},
        }
    )
    df = build_manifest(spec)
    y = targets(df, classes)
    for row, value in zip(y, labels[column].fillna(""), strict=True):
        assert {c for c, on in zip(classes, row, strict=True) if on} == set(
            filter(None, value.split("|"))
        )


def test_folders_with_split_layer(tmp_path):
    for split in ("train", "val", "test"):
        for cls, count in (("neg", 3), ("pos", 2)):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(np.zeros((4, 4), np.uint8)).save(folder / f"{i}.png")
    spec = spec_from_dict(
        {
            "name": "f",
            "task": "binary",
            "classes": ["neg", "pos"],
            "data": {"format": "folders", "path": str(tmp_path)},
        }
    )
    df = build_manifest(spec)
    assert df.groupby(["split", "label"]).size().to_dict() == {
        (s, c): n for s in ("test", "train", "val") for c, n in (("neg", 3), ("pos", 2))
    }
    (tmp_path / "train" / "other").mkdir()
    with pytest.raises(SpecError, match=r"folder train/other is not one of \['neg', 'pos'\]"):
        build_manifest(spec)


def test_fingerprint_follows_content_and_labels_not_location(tmp_path):
    spec = csv_spec(make_csv_dataset(tmp_path, n_patients=6))
    df = build_manifest(spec)
    first = fingerprint(df)
    assert fingerprint(df) == first
    relabelled = df.copy()
    relabelled.loc[0, "label"] = "pos"
    assert fingerprint(relabelled) != first
    Image.fromarray(np.full((8, 8), 200, np.uint8)).save(df["path"].iloc[0])
    assert fingerprint(df) != first


@pytest.fixture(scope="module")
def dicom_archive(tmp_path_factory):
    from medtransfer.synthetic import generate_dicom_dataset

    root = tmp_path_factory.mktemp("archive")
    manifest = pd.read_csv(generate_dicom_dataset(root, n_patients=12, seed=2))
    (root / "dicom" / "README.txt").write_text("not an image")  # passed over by content
    sops = [
        str(pydicom.dcmread(root / p, stop_before_pixels=True).SOPInstanceUID)
        for p in manifest["path"]
    ]
    manifest["sop_instance_uid"] = sops
    manifest["relative"] = manifest["path"].str.removeprefix("dicom/")
    return root, manifest


def dicom_folder_spec(root, labels, **data):
    return spec_from_dict(
        {
            "name": "archive",
            "task": "binary",
            "classes": ["normal", "finding"],
            "data": {
                "format": "dicom_folder",
                "path": str(root / "dicom"),
                "labels": str(labels),
                **data,
            },
            "split": {"val": 0.25, "test": 0.25},
        }
    )


def test_dicom_folder_keyed_by_sop_instance_uid(dicom_archive, tmp_path):
    root, manifest = dicom_archive
    labels = tmp_path / "labels.csv"
    manifest[["sop_instance_uid", "label"]].to_csv(labels, index=False)
    spec = dicom_folder_spec(root, labels, key="sop_instance_uid", site_tag="InstitutionName")
    df = build_manifest(spec)
    assert len(df) == len(manifest)
    expected = dict(
        zip(
            manifest["path"].map(lambda p: str((root / p).resolve())),
            manifest["label"],
            strict=True,
        )
    )
    assert dict(zip(df["path"], df["label"], strict=True)) == expected
    # patients come from the DICOM PatientID, hashed; sites from a hashed institution name
    truth = manifest.set_index(manifest["path"].map(lambda p: str((root / p).resolve())))
    assert (
        df.groupby("patient")["path"].apply(lambda p: truth.loc[p, "patient_id"].nunique()).max()
        == 1
    )
    assert df["patient"].nunique() == 12
    assert df["site"].nunique() == 2 and all(s.startswith("site-") for s in df["site"])
    assert not df.astype(str).apply(lambda c: c.str.contains("SYNTHETIC|QS-")).any().any()
    assert df.groupby("patient")["split"].nunique().max() == 1


def test_dicom_folder_keyed_by_path_with_safe_site_tag(dicom_archive, tmp_path):
    root, manifest = dicom_archive
    labels = tmp_path / "labels.csv"
    manifest[["relative", "label"]].head(10).to_csv(labels, index=False)
    spec = dicom_folder_spec(
        root, labels, key="path", key_column="relative", site_tag="Manufacturer"
    )
    df = build_manifest(spec)
    assert len(df) == 10  # only labelled files take part
    assert set(df["site"]) <= {"Synthetica Medical", "Phantom Imaging Systems"}


def test_dicom_folder_labels_without_a_file_are_an_error(dicom_archive, tmp_path):
    root, manifest = dicom_archive
    labels = tmp_path / "labels.csv"
    table = manifest[["sop_instance_uid", "label"]].copy()
    table.loc[0, "sop_instance_uid"] = "1.2.3.4"
    table.to_csv(labels, index=False)
    spec = dicom_folder_spec(root, labels, key="sop_instance_uid")
    with pytest.raises(
        SpecError, match=r"1 labelled image\(s\) not found as DICOM .* '1\.2\.3\.4'"
    ):
        build_manifest(spec)


def test_dicom_folder_needs_a_labels_file(dicom_archive):
    root, _ = dicom_archive
    with pytest.raises(SpecError, match="format dicom_folder needs labels"):
        spec_from_dict(
            {
                "name": "x",
                "task": "binary",
                "classes": ["a", "b"],
                "data": {"format": "dicom_folder", "path": str(root)},
            }
        )
