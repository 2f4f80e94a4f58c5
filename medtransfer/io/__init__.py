"""Image reading: DICOM and ordinary image files to float32 arrays in [0, 1].

Imported by spawned decode workers, so nothing here (or below) imports TensorFlow or Keras.
"""

from medtransfer.io.dicom import (
    DEFAULT_MAX_PIXELS,
    DicomDecodeError,
    DicomImage,
    ImageReadError,
    ImageTooLargeError,
    NotDicomError,
    UnsupportedDicomError,
    is_dicom,
    is_uncompressed_dicom,
    patient_key,
    read_dicom,
)
from medtransfer.io.images import LoadedImage, load_image, read_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DicomDecodeError",
    "DicomImage",
    "ImageReadError",
    "ImageTooLargeError",
    "LoadedImage",
    "NotDicomError",
    "UnsupportedDicomError",
    "is_dicom",
    "is_uncompressed_dicom",
    "load_image",
    "patient_key",
    "read_dicom",
    "read_image",
]
