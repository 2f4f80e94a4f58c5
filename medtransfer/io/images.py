"""PNG/JPEG/TIFF -> float32 image in [0, 1], and one loader for any image file.

``load_image`` is what decode workers call for every file found in a folder: it decides by
content (DICOM or not), so a DICOM named ``.jpg`` or a PNG named ``.dcm`` still decodes, and
every failure comes back as one ``ImageReadError`` line for ``scores.csv``. Like ``dicom.py``
this module never imports TensorFlow.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from medtransfer.io.dicom import (
    DEFAULT_MAX_PIXELS,
    FilePath,
    Frames,
    ImageReadError,
    ImageTooLargeError,
    Window,
    check_pixel_budget,
    is_dicom,
    read_dicom,
)

__all__ = ["LoadedImage", "load_image", "read_image"]

# Modes Pillow can turn into RGB without losing meaning (CMYK and YCbCr JPEGs, LAB/HSV TIFFs).
_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV", "RGBX")


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """What a decode worker hands back: pixels plus the identifiers ``scores.csv`` needs.

    ``pixels`` is float32 [H, W] or [H, W, 3] in [0, 1]; ``sop_instance_uid`` is "" and
    ``meta`` is {} for non-DICOM files (``eq=False``: arrays have no single truth value).
    """

    pixels: np.ndarray
    sop_instance_uid: str
    meta: dict[str, Any]


def load_image(
    path: FilePath,
    *,
    window: Window = "dicom",
    frames: Frames = "first",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> LoadedImage:
    """Decode any supported file, choosing the reader by content rather than by extension.

    ``window`` and ``frames`` apply to DICOM only (see ``read_dicom``); ``max_pixels`` is the
    pixel budget for every format (None: none). Raises ImageReadError for anything that cannot
    become an image.
    """
    if is_dicom(path):
        image = read_dicom(path, window=window, frames=frames, max_pixels=max_pixels)
        return LoadedImage(image.pixels, image.meta.get("SOPInstanceUID") or "", image.meta)
    return LoadedImage(read_image(path, max_pixels=max_pixels), "", {})


def read_image(path: FilePath, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a PNG/JPEG/TIFF with Pillow as float32 [H, W] or [H, W, 3] in [0, 1].

    8-bit data is divided by 255 and 16-bit by 65535, so an image exported at either depth
    lands on the same scale. EXIF orientation is applied, as any viewer would. An image whose
    header claims more than ``max_pixels`` (width x height x bands) is refused before its
    pixels are decoded; so is one past Pillow's own decompression-bomb limit.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89 M pixels; the pixel budget below is the rule that applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            check_pixel_budget(image.height, image.width, len(image.getbands()), 1, max_pixels)
            ImageOps.exif_transpose(image, in_place=True)
            return _to_float(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"image too large: {exc}") from exc
    except UnidentifiedImageError as exc:
        message = "empty file" if _is_empty(path) else "not a DICOM file or an image Pillow reads"
        raise ImageReadError(message) from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        raise ImageReadError(f"cannot open file: {exc.strerror}") from exc
    except Exception as exc:
        raise ImageReadError(f"corrupt image: {exc}") from exc


def _is_empty(path: FilePath) -> bool:
    try:
        with open(path, "rb") as f:
            return not f.read(1)
    except OSError:
        return False


def _to_float(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode == "P":
        image, mode = _from_palette(image)
    elif mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    elif mode in _TO_RGB:
        image, mode = image.convert("RGB"), "RGB"
    if mode in ("LA", "RGBA"):
        return _over_black(np.asarray(image))
    array = np.asarray(image)
    if mode == "1":
        return array.astype(np.float32)
    if mode in ("L", "RGB"):
        return _scaled(array, 255.0)
    if mode.startswith("I;16"):
        return _scaled(array, 65535.0)
    if mode in ("I", "F"):
        return _single_channel(array)
    raise ImageReadError(f"unsupported image mode: {mode}")


def _from_palette(image: Image.Image) -> tuple[Image.Image, str]:
    # Grey palettes are common in exported medical PNGs; keep them one channel.
    if "transparency" in image.info:
        return image.convert("RGBA"), "RGBA"
    palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
    if (palette == palette[:, :1]).all():
        return image.convert("L"), "L"
    return image.convert("RGB"), "RGB"


def _scaled(array: np.ndarray, maximum: float) -> np.ndarray:
    # Division, not multiplication by a reciprocal: keeps 255/255 exactly 1.0.
    pixels = array.astype(np.float32)
    pixels /= maximum
    return pixels


def _over_black(array: np.ndarray) -> np.ndarray:
    # Transparent pixels carry arbitrary colour; compositing onto black (the background of
    # radiographs) keeps them from looking like anatomy.
    pixels = array[..., :-1].astype(np.float32)
    pixels *= array[..., -1:]
    pixels /= 255.0 * 255.0
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def _single_channel(array: np.ndarray) -> np.ndarray:
    # 32-bit integer and float TIFFs have no nominal range: 16-bit data stays on the 16-bit
    # scale, data already in [0, 1] is kept, anything else is stretched to its min/max.
    pixels = array.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    if array.dtype.kind in "iu" and low >= 0 and high <= 65535:
        pixels /= 65535.0
    elif not (low >= 0 and high <= 1):
        pixels -= low
        pixels /= max(high - low, np.finfo(np.float32).tiny)
    return pixels
