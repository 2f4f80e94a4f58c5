"""Helpers shared by the scoring benchmarks: input folders, a benchmark model, a stand-in model.

Nothing here imports TensorFlow at module level: ``bench_predictor`` imports it when called, so
a benchmark that only needs ``StandInPredictor`` stays a light process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_ROOT_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
CLASSES = ["a", "b"]


def link_corpus(folder: Path, repeat: int) -> None:
    """``repeat`` copies of the real corpus as symlinks: real files and no extra disk; after one
    warm-up pass every setting reads the same files from the page cache."""
    for copy in range(repeat):
        target = folder / f"copy{copy}"
        target.mkdir(parents=True)
        for file in sorted(CORPUS.iterdir()):
            (target / file.name).symlink_to(file)


def write_dicoms(folder: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` uncompressed DX radiographs, ``size`` x ``size``, 16-bit MONOCHROME2 (12 bits
    stored), Explicit VR Little Endian, with the tags a hospital export carries. Each file has
    its own UIDs and its own noise; the header is built once and only those change."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ds = _dx_template(size)
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    body = 3000 - 1800 * (x**2 + 0.5 * y**2)  # a bright centre fading to the edges
    for i in range(n):
        uid = f"{PYDICOM_ROOT_UID}9.{seed}.{i}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid
        ds.SeriesInstanceUID = f"{uid}.1"
        ds.StudyInstanceUID = f"{uid}.2"
        ds.PatientID = f"BENCH{i:06d}"
        ds.PatientName = f"BENCH^PATIENT{i:06d}"
        ds.AccessionNumber = f"ACC{i:06d}"
        noise = rng.normal(0, 60, (size, size))
        ds.PixelData = np.clip(body + noise, 0, 4095).astype("<u2").tobytes()
        ds.save_as(folder / f"{i:06d}.dcm", enforce_file_format=True)


def _dx_template(size: int) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.Modality = "DX"
    ds.Manufacturer = "Benchmark Imaging"
    ds.InstitutionName = "BENCHMARK HOSPITAL"
    ds.ReferringPhysicianName = "BENCH^REFERRER"
    ds.PatientBirthDate = "19700101"
    ds.PatientAge = "055Y"
    ds.PatientSex = "F"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID = "1"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "F"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    ds.PixelRepresentation = 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.PixelData = b""
    ds["PixelData"].VR = "OW"
    return ds


def bench_predictor(backbone: str, size: int, batch_size: int = 32):
    """A ``KerasPredictor`` over ``build_model`` (random initialisation, one channel, two
    classes), as scoring would load it from a run."""
    from medtransfer.models.build import build_model
    from medtransfer.predictor import KerasPredictor, ModelInfo
    from medtransfer.spec import spec_from_dict

    spec = spec_from_dict(
        {
            "name": "bench",
            "task": "binary",
            "classes": CLASSES,
            "data": {"format": "folders", "path": str(CORPUS)},
            "image": {"size": [size, size], "channels": 1},
            "model": {"backbone": backbone, "weights": "none"},
        }
    )
    info = ModelInfo("bench", "binary", CLASSES, "b", (size, size), 1, "dicom", "first")
    return KerasPredictor(build_model(spec), info, batch_size)


class StandInPredictor:
    """Scoring's ``Predictor`` protocol without a model (no TensorFlow): one mean per image. For
    measuring what scoring itself costs (decoding, transport, the CSV), not a network."""

    class_names = CLASSES
    window = "dicom"
    frames = "first"
    tabular: Sequence = ()
    image_size = (224, 224)
    channels = 1
    profile = None
    ood_validation = None

    def predict_with_ood(
        self, images: list[np.ndarray], tabular: Mapping[str, Sequence] | None = None
    ) -> tuple[np.ndarray, None]:
        return self.predict(images, tabular), None

    def predict(
        self, images: list[np.ndarray], tabular: Mapping[str, Sequence] | None = None
    ) -> np.ndarray:
        p = np.array([float(image.mean()) for image in images], np.float32).clip(0, 1)
        return np.stack([1 - p, p], axis=1)
