"""Manifests: one row per image with its split, patient key, site and label targets.

Every data source (npz archive, CSV manifest, class folders) becomes the same table, so the rest
of the toolkit never cares where images came from. Patient identifiers are replaced by a salted
hash as soon as they are read: the table can be written into a run directory without carrying
PHI, and splits are made per patient so one patient's images never sit on both sides of a split.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.errors import InvalidDicomError

from medtransfer.data.tabular import column_name, parse_values, tolerant_values
from medtransfer.errors import SpecError
from medtransfer.io.dicom import SAFE_TAGS
from medtransfer.privacy import pseudonym
from medtransfer.spec import Spec

SPLITS = ("train", "val", "test")
NPZ_SEPARATOR = "#"
UNKNOWN_LABELS = ("", "-1")  # multilabel cells that say "not known": NaN targets, masked
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom", ""}


def target_columns(classes: list[str]) -> list[str]:
    return [f"y:{name}" for name in classes]


def build_manifest(spec: Spec) -> pd.DataFrame:
    """The spec's data as a manifest with columns path, split, patient, site, label, y:<class>
    and, for a spec with tabular features, t:<feature>."""
    builders = {
        "npz": _from_npz,
        "manifest": _from_csv,
        "folders": _from_folders,
        "dicom_folder": _from_dicom_folder,
    }
    if spec.tabular and spec.data.format not in ("manifest", "dicom_folder"):
        raise SpecError(
            f"{spec.origin}: tabular: format {spec.data.format} has no per-image table to read "
            f"{[f.name for f in spec.tabular]} from; use a manifest or dicom_folder"
        )
    df = builders[spec.data.format](spec)
    if "split" not in df.columns or df["split"].isna().any():
        df["split"] = _patient_split(df, spec)
    df = df.reset_index(drop=True)
    missing = [s for s in ("train", "val") if not (df["split"] == s).any()]
    if missing:
        raise SpecError(f"{spec.origin}: data: no images in split(s) {missing}")
    return df


def _fail(spec: Spec, field: str, message: str) -> SpecError:
    return SpecError(f"{spec.origin}: {field}: {message}")


def _targets_from_indices(indices: np.ndarray, spec: Spec) -> np.ndarray:
    k = len(spec.classes)
    if spec.task == "multilabel":
        if indices.ndim != 2 or indices.shape[1] != k:
            raise _fail(spec, "classes", f"labels have shape {indices.shape}, expected (N, {k})")
        return indices.astype(np.float32)
    flat = indices.reshape(len(indices), -1)
    if flat.shape[1] != 1:
        raise _fail(spec, "task", f"labels have shape {indices.shape}: one label per image needed")
    flat = flat[:, 0].astype(np.int64)
    bad = sorted(set(flat[(flat < 0) | (flat >= k)].tolist()))
    if bad:
        raise _fail(spec, "classes", f"label values {bad} have no class (there are {k} classes)")
    return np.eye(k, dtype=np.float32)[flat]


def _frame(paths: list[str], targets: np.ndarray, spec: Spec, **columns) -> pd.DataFrame:
    df = pd.DataFrame({"path": paths, **columns})
    for name, column in zip(target_columns(spec.classes), targets.T, strict=True):
        df[name] = column
    df["label"] = [
        "|".join(c for c, on in zip(spec.classes, row, strict=True) if on > 0.5) for row in targets
    ]
    return df


def _from_npz(spec: Spec) -> pd.DataFrame:
    path = spec.data.path
    parts = []
    with np.load(path) as archive:
        for split in SPLITS:
            if f"{split}_images" not in archive:
                continue
            labels_key = f"{split}_labels"
            if labels_key not in archive:
                raise _fail(
                    spec, "data.path", f"{path.name} has {split}_images but no {labels_key}"
                )
            labels = np.asarray(archive[labels_key])
            n = len(labels)
            paths = [f"{path}{NPZ_SEPARATOR}{split}/{i}" for i in range(n)]
            targets = _targets_from_indices(labels, spec)
            parts.append(
                _frame(
                    paths, targets, spec, split=split, patient=[f"{split}/{i}" for i in range(n)]
                )
            )
    if not parts:
        raise _fail(spec, "data.path", f"{path.name} has no train_images/val_images/test_images")
    df = pd.concat(parts, ignore_index=True)
    df["site"] = ""
    return df


def _labels_from_csv(table: pd.DataFrame, spec: Spec) -> np.ndarray:
    columns = spec.data.label_columns
    k = len(spec.classes)
    if spec.task == "multilabel" and len(columns) == k:
        cells = table[columns].apply(lambda column: column.str.strip())
        unknown = cells.isin(UNKNOWN_LABELS)
        values = cells.mask(unknown, "0").apply(pd.to_numeric, errors="coerce")
        if values.isna().any().any() or not values.isin([0, 1]).all().all():
            raise _fail(
                spec,
                "data.label_columns",
                "multilabel columns must hold 0, 1, or (unknown) an empty cell or -1",
            )
        return values.mask(unknown).to_numpy(np.float32)
    if len(columns) != 1:
        raise _fail(
            spec,
            "data.label_columns",
            f"give one label column (or, for multilabel, one 0/1 column per class: {k})",
        )
    raw = table[columns[0]].fillna("").astype(str).str.strip()
    index = {name: i for i, name in enumerate(spec.classes)}
    if spec.task == "multilabel":
        out = np.zeros((len(raw), k), np.float32)
        for row, value in enumerate(raw):
            for token in filter(None, (t.strip() for t in value.split(spec.data.label_separator))):
                if token not in index:
                    raise _fail(spec, "classes", f"label {token!r} (row {row + 2}) is not a class")
                out[row, index[token]] = 1
        return out
    unknown = sorted(set(raw) - set(index) - {str(i) for i in range(k)})
    if unknown:
        raise _fail(
            spec,
            "classes",
            f"label value(s) {unknown[:5]} in column {columns[0]!r} match no class in "
            f"{spec.classes} (use the class names or 0..{k - 1})",
        )
    indices = np.array([index[v] if v in index else int(v) for v in raw])
    return np.eye(k, dtype=np.float32)[indices]


def _read_table(spec: Spec, path: Path, field: str, key_column: str) -> pd.DataFrame:
    """A CSV of the spec, as text, with every column the spec names checked up front."""
    source = spec.data
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    wanted = [key_column, *source.label_columns]
    wanted += [c for c in (source.patient_column, source.site_column, source.split_column) if c]
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise _fail(
            spec, field, f"column(s) {missing} not in {path.name} (it has {list(table.columns)})"
        )
    return table


def _from_csv(spec: Spec) -> pd.DataFrame:
    source = spec.data
    table = _read_table(spec, source.path, "data", source.image_column)
    if table.empty:
        raise _fail(spec, "data.path", f"{source.path.name} has no rows")
    root = source.path.parent
    paths = [str((root / p).resolve()) for p in table[source.image_column]]
    absent = [p for p in paths if not Path(p).is_file()]
    if absent:
        raise _fail(
            spec, "data.path", f"{len(absent)} image file(s) listed but missing, e.g. {absent[0]}"
        )
    salt = f"medtransfer:{spec.name}"
    patients = (
        [pseudonym(p, salt) for p in table[source.patient_column]]
        if source.patient_column
        else [pseudonym(p, salt) for p in paths]
    )
    columns = {
        "patient": patients,
        "site": table[source.site_column].tolist() if source.site_column else "",
    }
    if source.split_column:
        columns["split"] = _split_values(table[source.split_column], spec)
    columns |= _tabular_columns(spec, table, lambda tags: read_tags(paths, tags))
    return _frame(paths, _labels_from_csv(table, spec), spec, **columns)


def read_tags(paths: list[str], tags: list[str]) -> pd.DataFrame:
    """Columns ``_<tag>`` with each file's tag values ("" when absent or not a DICOM file)."""
    rows = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            ds = {}
        rows.append({f"_{tag}": str(ds.get(tag, "") or "") for tag in tags})
    return pd.DataFrame(rows, columns=[f"_{tag}" for tag in tags])


def _tabular_columns(
    spec: Spec, table: pd.DataFrame, tag_table: Callable[[list[str]], pd.DataFrame]
) -> dict[str, list]:
    """``t:<feature>`` columns: from the CSV column when it has one, else from the DICOM tag.

    A malformed number in the CSV is an error (someone typed it and can fix it); in a DICOM
    header it is a missing value, counted in a warning (archives hold odd headers, and one must
    not stop a training set). Categories outside the spec's ``values`` are warned about: the
    model will see them as "other or missing".
    """
    from_tags = [f for f in spec.tabular if f.source_column not in table.columns and f.source_tag]
    tags = tag_table(sorted({f.source_tag for f in from_tags})) if from_tags else None
    columns: dict[str, list] = {}
    for feature in spec.tabular:
        field = f"tabular.{feature.name}"
        if feature.source_column in table.columns:
            try:
                values = parse_values(table[feature.source_column], feature)
            except ValueError as error:
                raise _fail(spec, field, f"column {feature.source_column!r}: {error}") from None
        elif feature in from_tags:
            raw = tags[f"_{feature.source_tag}"]
            values = tolerant_values(raw, feature)
            bad = sum(
                feature.type == "numeric" and bool(r.strip()) and math.isnan(v)
                for r, v in zip(raw, values, strict=True)
            )
            if bad:
                warnings.warn(
                    f"{spec.origin}: {field}: {bad} file(s) have a {feature.source_tag} that is "
                    "not a number; treated as missing",
                    stacklevel=3,
                )
        else:
            raise _fail(
                spec,
                field,
                f"the labels CSV has no column {feature.source_column!r}, and the feature has "
                "no DICOM tag to read instead (set column: or tag:)",
            )
        if feature.type == "categorical":
            other = sorted(set(values) - set(feature.values) - {""})
            if other:
                warnings.warn(
                    f"{spec.origin}: {field}: value(s) {other[:5]} are not in values "
                    f"{feature.values}; the model sees them as other-or-missing",
                    stacklevel=3,
                )
        columns[column_name(feature.name)] = values
    return columns


def _split_values(column: pd.Series, spec: Spec) -> list[str]:
    split = column.str.strip().str.lower()
    bad = sorted(set(split) - set(SPLITS))
    if bad:
        raise _fail(spec, "data.split_column", f"values {bad} are not train/val/test")
    return split.tolist()


def _dicom_headers(root: Path, tags: list[str]) -> pd.DataFrame:
    """Relative path, SOPInstanceUID and the requested tags of every DICOM image under root.

    Files are recognised by content; non-DICOM files and DICOMDIRs are passed over (a labels
    CSV decides which images take part, and ``medtransfer inspect`` reports the rest).
    """
    rows = []
    wanted = ["SOPInstanceUID", "SOPClassUID", *tags]
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=wanted)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if "SOPInstanceUID" not in ds or str(ds.get("SOPClassUID", "")) == _DICOMDIR_CLASS:
            continue
        row = {"_path": path.relative_to(root).as_posix(), "_file": str(path.resolve())}
        row["_sop_instance_uid"] = str(ds.SOPInstanceUID)
        row.update({f"_{tag}": str(ds.get(tag, "") or "") for tag in tags})
        rows.append(row)
    columns = ["_path", "_file", "_sop_instance_uid", *(f"_{tag}" for tag in tags)]
    return pd.DataFrame(rows, columns=columns)


def _from_dicom_folder(spec: Spec) -> pd.DataFrame:
    source = spec.data
    key = source.label_key_column
    table = _read_table(spec, source.labels, "data.labels", key)
    tags = [t for t in ("PatientID", source.site_tag) if t]
    tags += [f.source_tag for f in spec.tabular if f.source_tag and f.source_tag not in tags]
    headers = _dicom_headers(source.path, tags)
    by = f"_{source.key}"
    if headers[by].duplicated().any():
        dup = headers.loc[headers[by].duplicated(), by].iloc[0]
        raise _fail(spec, "data.key", f"{dup!r} names more than one file under {source.path}")
    joined = table.merge(headers, left_on=key, right_on=by, how="left", indicator=True)
    unmatched = joined.loc[joined["_merge"] == "left_only", key].tolist()
    if unmatched:
        raise _fail(
            spec,
            "data.labels",
            f"{len(unmatched)} labelled image(s) not found as DICOM under {source.path} "
            f"by {source.key}, e.g. {unmatched[0]!r}",
        )
    salt = f"medtransfer:{spec.name}"
    identity = joined[source.patient_column] if source.patient_column else joined["_PatientID"]
    if not source.patient_column and (identity == "").any():
        raise _fail(spec, "data.patient_column", "some files have no PatientID; name a column")
    columns = {"patient": [pseudonym(p, salt) for p in identity], "site": ""}
    if source.site_column:
        columns["site"] = joined[source.site_column].tolist()
    elif source.site_tag:
        values = joined[f"_{source.site_tag}"]
        keep = source.site_tag in SAFE_TAGS
        columns["site"] = [v if keep else f"site-{pseudonym(v, salt)[:8]}" for v in values]
    if source.split_column:
        columns["split"] = _split_values(joined[source.split_column], spec)
    columns |= _tabular_columns(spec, joined, lambda _: joined)
    return _frame(joined["_file"].tolist(), _labels_from_csv(joined, spec), spec, **columns)


def _from_folders(spec: Spec) -> pd.DataFrame:
    if spec.task == "multilabel":
        raise _fail(spec, "data.format", "folders cannot express multilabel data; use a manifest")
    root = spec.data.path
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    layered = bool(subdirs) and set(subdirs) <= set(SPLITS)
    roots = [(root / s, s) for s in subdirs] if layered else [(root, None)]
    rows: list[tuple[str, str | None, int]] = []
    for base, split in roots:
        for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            if class_dir.name not in spec.classes:
                raise _fail(
                    spec,
                    "classes",
                    f"folder {class_dir.relative_to(root)} is not one of {spec.classes}",
                )
            label = spec.classes.index(class_dir.name)
            rows += [
                (str(f.resolve()), split, label)
                for f in sorted(class_dir.rglob("*"))
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            ]
    if not rows:
        raise _fail(spec, "data.path", f"no images under {root}/<class>/")
    paths, splits, labels = zip(*rows, strict=True)
    salt = f"medtransfer:{spec.name}"
    columns = {"patient": [pseudonym(p, salt) for p in paths], "site": ""}
    if layered:
        columns["split"] = list(splits)
    targets = _targets_from_indices(np.array(labels), spec)
    return _frame(list(paths), targets, spec, **columns)


def _patient_split(df: pd.DataFrame, spec: Spec) -> list[str]:
    """Assign whole patients to test/val/train, stratified by each patient's label pattern.

    Each patient gets a key (rank within its stratum + jitter) / stratum size; taking patients in
    key order fills test, then val, then train with exact overall counts while every stratum,
    however small, is spread proportionally across the splits.
    """
    rng = np.random.default_rng(spec.split.seed)
    by_patient = df.groupby("patient", sort=True)["label"].first()
    keys = pd.Series(0.0, index=by_patient.index)
    for _, patients in by_patient.groupby(by_patient, sort=True):
        order = rng.permutation(len(patients))
        keys[patients.index[order]] = (np.arange(len(patients)) + rng.random(len(patients))) / len(
            patients
        )
    ordered = keys.sort_values(kind="stable").index
    n_test = round(len(ordered) * spec.split.test)
    n_val = round(len(ordered) * spec.split.val)
    assignment = {
        pid: "test" if i < n_test else "val" if i < n_test + n_val else "train"
        for i, pid in enumerate(ordered)
    }
    return [assignment[p] for p in df["patient"]]


def targets(df: pd.DataFrame, classes: list[str]) -> np.ndarray:
    """The [N, K] float32 target matrix (one-hot or multi-hot; NaN = unknown) of a manifest."""
    return df[target_columns(classes)].to_numpy(np.float32)


def fingerprint(df: pd.DataFrame) -> str:
    """A content hash of what a run saw: image bytes, splits and labels (not where they live).

    The same data in another folder or on another machine gives the same fingerprint; any
    changed, added or relabelled image changes it.
    """
    sources = sorted({p.split(NPZ_SEPARATOR)[0] for p in df["path"]})
    root = os.path.commonpath(sources) if len(sources) > 1 else os.path.dirname(sources[0])
    h = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as handle:
            h.update(hashlib.file_digest(handle, "sha256").digest())
    relative = df["path"].map(lambda p: os.path.relpath(p, root))
    table = pd.DataFrame({"path": relative, "split": df["split"], "label": df["label"]})
    h.update(table.to_csv(index=False).encode())
    return h.hexdigest()[:16]
