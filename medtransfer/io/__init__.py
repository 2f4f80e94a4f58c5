"""Image reading: DICOM and ordinary image files to float32 arrays in [0, 1].

Imported by spawned decode workers, so nothing here (or below) imports TensorFlow or Keras.

pydicom logs its warnings, which quote element values (a malformed name or ID is PHI), to the
``pydicom`` logger, and that logger passes them on to the application's root handlers: any
program that configures logging would write them to its log files. Importing this package stops
that passing on; a handler attached to the ``pydicom`` logger itself (``pydicom.config.debug``)
still receives them, for whoever asks.
"""

import logging

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

logging.getLogger("pydicom").propagate = False

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
