"""DICOM file -> float32 image in [0, 1], plus the few tags that are safe to store.

Decode workers run this in spawned processes, so it imports numpy and pydicom only, never
TensorFlow. The pixel pipeline follows the DICOM display order (PS3.4 N.2): decode, Modality LUT,
VOI LUT, polarity, colour. Following that order is what makes two files that differ only in
transfer syntax, polarity (MONOCHROME1 vs MONOCHROME2) or rescale representation give the same
pixels, so a model never learns the scanner's encoding choices.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.pixels.decoders.base import Decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import get_nr_frames
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSLossless,
    JPEGLSNearLossless,
)

from medtransfer.privacy import pseudonym

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DicomDecodeError",
    "DicomImage",
    "ImageReadError",
    "ImageTooLargeError",
    "NotDicomError",
    "UnsupportedDicomError",
    "is_dicom",
    "patient_key",
    "read_dicom",
]

FilePath = str | PathLike[str]
SingleWindow = str | Mapping[str, float]
Window = SingleWindow | Sequence[SingleWindow]
Frames = Literal["first", "middle", "all"]

# Tags that describe the acquisition, never the patient. Free-text tags such as StudyDescription
# are left out even though they are often harmless: sites put names and dates in them.
SAFE_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "Manufacturer",
    "ManufacturerModelName",
    "Rows",
    "Columns",
    "BitsStored",
    "PhotometricInterpretation",
    "SOPClassUID",
    "SOPInstanceUID",
    "ImageType",
    "PixelSpacing",
    "ImagerPixelSpacing",
)
# The pixel budget: rows x columns x samples x frames a file may ask to decode. The largest real
# images (full-field mammograms at 4096 x 5120, 21 M pixels; stitched spine and leg radiographs)
# fit several times over, while the few-KB "decompression bombs" whose header claims
# 65535 x 65535 (4.3 G pixels, 8-17 GiB once decoded) are refused before any codec runs.
DEFAULT_MAX_PIXELS = 2**27  # 134,217,728 pixels: 512 MiB as float32
# A deflated data set may inflate to this many bytes per pixel of the budget (the pixels at up
# to 32 bits plus the other elements), checked in a bounded pass before pydicom inflates it.
_INFLATED_BYTES_PER_PIXEL = 4
_INFLATE_CHUNK = 1 << 20
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_FLOAT_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009})  # Float and Double Float Pixel Data
_FUNCTIONAL_GROUPS = frozenset({0x52009229, 0x52009230})  # Shared and Per-frame
_PERCENTILES = (0.5, 99.5)

# Named CT windows (center, width) in Hounsfield units, as radiology workstations ship them.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (50.0, 350.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (60.0, 160.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
_AUTO_WINDOWS = ("dicom", "minmax", "percentile")
_CT_FLOOR_HU = -8192.0
_CT_IMPLAUSIBLE_SHARE = 0.001


class ImageReadError(Exception):
    """One-line, user-facing reason a file could not become an image (``str(e)`` is that line).

    Scoring writes the line into ``scores.csv`` and carries on with the next file, so every way a
    bad file can fail has to arrive as this type rather than as whatever a codec raised; the
    message is collapsed onto one line because it ends up in a CSV cell.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class NotDicomError(ImageReadError):
    """The content is not DICOM, so a caller may still try another reader."""


class ImageTooLargeError(ImageReadError):
    """An image (or a deflated data set) larger than the pixel budget, refused before decoding:
    a few-KB file can claim gigapixels, and decoding it would exhaust the machine's memory."""


def check_pixel_budget(
    rows: int, columns: int, samples: int, frames: int, budget: int | None
) -> None:
    """Raise ImageTooLargeError when rows x columns x samples x frames exceeds ``budget``
    (None: no budget)."""
    pixels = rows * columns * samples * frames
    if budget is not None and pixels > budget:
        raise ImageTooLargeError(
            f"image too large: {rows} x {columns} pixels x {samples} sample(s) x {frames} "
            f"frame(s) = {pixels:,} pixels, over the pixel budget of {budget:,}"
        )


class UnsupportedDicomError(ImageReadError):
    """Valid DICOM without a displayable image (SR, RT Plan, DICOMDIR, unknown colour space)."""


class DicomDecodeError(ImageReadError):
    """An image object whose bytes are corrupt, truncated or inconsistent with its tags."""


@dataclass(frozen=True, eq=False)
class DicomImage:
    """Decoded pixels and safe metadata (``eq=False``: arrays have no single truth value).

    ``pixels`` is float32, [H, W] for monochrome or [H, W, 3] for colour, in [0, 1]. ``meta``
    holds the keywords in ``SAFE_TAGS`` plus ``TransferSyntaxUID`` and ``NumberOfFrames`` (None
    when absent, so every file yields the same columns) and what the pipeline chose:
    ``frame_index``, ``window_center``, ``window_width`` (modality units, None when not a
    linear window) and ``window_source`` (``file``, ``voi_lut``, ``minmax``, ``percentile``,
    ``explicit``, ``minmax_fallback`` or ``none`` for colour).
    """

    pixels: np.ndarray
    meta: dict[str, Any]


def is_dicom(path: FilePath) -> bool:
    """Tell DICOM from other files by content, because archives name files arbitrarily.

    Part 10 files carry 'DICM' at offset 128; files without that preamble are accepted only if
    they start like a data set and pydicom finds a SOP Class in them.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if not _starts_like_dataset(head):
        return False
    try:
        _read_dataset(path, stop_before_pixels=True)
    except ImageReadError:
        return False
    return True


def is_uncompressed_dicom(path: FilePath) -> bool:
    """True for a Part 10 DICOM file whose pixels are stored uncompressed and not deflated.

    Decoding such a file runs no compiled codec, only a copy and arithmetic in numpy, so it is
    safe and cheap to do in the main process; everything else (other or unknown transfer
    syntaxes, deflate, files without preamble, PNG, unreadable files) is False and goes to a
    decode worker, where time and memory are capped. Reads the File Meta header only, and never
    raises: the main process decides with it for every file of a hostile archive.
    """
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:132] != b"DICM":
                return False
            tsyntax = UID(_read_file_meta_info(f).get("TransferSyntaxUID") or "")
        # A UID that names no transfer syntax (a bit flip) makes is_compressed raise.
        return tsyntax.is_transfer_syntax and not (tsyntax.is_compressed or tsyntax.is_deflated)
    except Exception:  # any bytes at all may arrive here; the worker reports what is wrong
        return False


def read_dicom(
    path: FilePath,
    *,
    window: Window = "dicom",
    frames: Frames = "first",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DicomImage:
    """Decode a DICOM image into float32 [0, 1] with safe metadata.

    ``window`` is ``"dicom"`` (the file's first WindowCenter/Width, else its VOI LUT Sequence,
    else min/max), ``"minmax"``, ``"percentile"`` (0.5-99.5), ``{"center": c, "width": w}`` in
    modality units, or a CT preset name (``CT_WINDOWS``, Hounsfield units; CT files only). A list
    of three windows stacks them into the three channels of an [H, W, 3] image (e.g. lung,
    mediastinum, bone), which gives an RGB backbone three views of one CT slice. Colour images
    are only scaled by their bit depth.
    ``frames`` picks the ``"first"`` or ``"middle"`` frame of a multi-frame object, or ``"all"``
    frames as an [F, H, W(, 3)] stack (each frame through its own per-frame rescale and window).

    ``max_pixels`` is the pixel budget (None: none): rows x columns x samples x frames decoded
    above it raise ImageTooLargeError before any codec runs, as does a deflated data set that
    would inflate past 4 bytes per pixel of it.

    Raises ImageReadError (or a subclass) for any file that cannot become an image, and
    ValueError for an invalid ``window`` or ``frames`` argument, which is the caller's mistake.
    """
    windows = _parse_windows(window)
    if frames not in ("first", "middle", "all"):
        raise ValueError(f"frames must be 'first', 'middle' or 'all', not {frames!r}")
    inflated = None if max_pixels is None else _INFLATED_BYTES_PER_PIXEL * max_pixels
    ds = _read_dataset(path, max_inflated=inflated)
    _require_pixels(ds)
    tsyntax = _transfer_syntax(ds)
    try:
        n_frames = get_nr_frames(ds, warn=False)
    except Exception as exc:
        raise DicomDecodeError(f"invalid NumberOfFrames: {exc}") from exc
    _check_budget(ds, n_frames if frames == "all" else 1, max_pixels)
    if frames == "all":
        rendered = [_render_frame(ds, tsyntax, i, window, windows) for i in range(n_frames)]
        pixels, used = np.stack([p for p, _ in rendered]), rendered[0][1]
        index = 0
    else:
        index = 0 if frames == "first" else n_frames // 2
        pixels, used = _render_frame(ds, tsyntax, index, window, windows)
    meta = _safe_meta(ds, tsyntax, n_frames, index)
    meta["window_center"], meta["window_width"], meta["window_source"] = used
    return DicomImage(pixels=pixels, meta=meta)


def _render_frame(
    ds: Dataset, tsyntax: UID, index: int, window: Window, windows: list[tuple]
) -> tuple[np.ndarray, tuple]:
    """One frame through the display pipeline: modality LUT, window(s), polarity, colour."""
    stored, photometric = _decode(ds, tsyntax, index)
    try:
        if photometric not in ("MONOCHROME1", "MONOCHROME2"):
            return _colour(stored, ds, photometric), (None, None, "none")
        values = _modality(stored, ds, index)
        _check_hounsfield(ds, window)
        _check_plausible_ct(ds, stored, values)
        # _voi works in place, so stacked windows each need their own copy.
        copy = len(windows) > 1
        views = [_voi(values.copy() if copy else values, ds, index, *w) for w in windows]
        pixels, used = views[0] if len(views) == 1 else _stack(views)
        if photometric == "MONOCHROME1" or _presentation_inverse(ds):
            np.subtract(1.0, pixels, out=pixels)
        return pixels, used
    except ImageReadError:
        raise
    except Exception as exc:
        raise DicomDecodeError(f"invalid image attributes ({photometric}): {exc}") from exc


def patient_key(ds_or_path: Dataset | FilePath, salt: str) -> str:
    """Salted SHA-256 (first 16 hex chars) of PatientID, for patient-level splits.

    Splitting by patient needs a stable per-patient key, but manifests and run directories must
    not hold the ID itself. The salt (a per-project secret) is mandatory: without it anyone could
    hash candidate IDs, which are short and structured, and match them against the keys.
    """
    ds = (
        ds_or_path
        if isinstance(ds_or_path, Dataset)
        else _read_dataset(ds_or_path, stop_before_pixels=True)
    )
    patient_id = str(ds.get("PatientID") or "").strip()
    if not patient_id:
        raise ImageReadError("no PatientID: cannot derive a patient key")
    return pseudonym(patient_id, salt)


def _starts_like_dataset(head: bytes) -> bool:
    # A data set without preamble starts with its lowest group: file meta (0002) or, without
    # meta, the SOP Common group (0008), in either byte order.
    groups = {int.from_bytes(head[:2], "little"), int.from_bytes(head[:2], "big")}
    return len(head) >= 8 and bool(groups & {0x0002, 0x0008})


def _check_budget(ds: Dataset, frames: int, budget: int | None) -> None:
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel") or 1)
    except (AttributeError, TypeError, ValueError):
        return  # no usable size: the decoder reports the inconsistency
    check_pixel_budget(rows, columns, samples, frames, budget)


def _check_inflated_size(f: Any, limit: int) -> None:
    """Inflate the deflated data set at ``f``'s position in bounded chunks, discarding the
    output, and refuse it if it would grow past ``limit`` bytes: pydicom inflates the whole data
    set in one call, so a few-MB zip bomb would otherwise take gigabytes first."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    while chunk := f.read(_INFLATE_CHUNK):
        while chunk:
            size += len(inflater.decompress(chunk, _INFLATE_CHUNK))
            if size > limit:
                raise ImageTooLargeError(
                    f"image too large: the deflated data set inflates past {limit:,} bytes "
                    f"({_INFLATED_BYTES_PER_PIXEL} bytes per pixel of the pixel budget)"
                )
            chunk = inflater.unconsumed_tail
        if inflater.eof:
            return


def _file_meta(f: Any, head: bytes) -> FileMetaDataset:
    """The File Meta group (empty if none), leaving ``f`` at the first byte after it."""
    f.seek(132 if head[128:132] == b"DICM" else 0)
    return _read_file_meta_info(f)  # pydicom's own reader for just this group


def _read_dataset(
    path: FilePath,
    stop_before_pixels: bool = False,
    max_inflated: int | None = _INFLATED_BYTES_PER_PIXEL * DEFAULT_MAX_PIXELS,
) -> Dataset:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
            if not head:
                raise NotDicomError("not a DICOM file: empty file")
            preamble = head[128:132] == b"DICM"
            if not preamble and not _starts_like_dataset(head):
                raise NotDicomError("not a DICOM file")
            deflated = (
                _file_meta(f, head).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            )
            if deflated and max_inflated is not None:
                _check_inflated_size(f, max_inflated)
            f.seek(0)
            if preamble:
                return pydicom.dcmread(f, stop_before_pixels=stop_before_pixels)
            ds = pydicom.dcmread(f, force=True, stop_before_pixels=stop_before_pixels)
    except ImageReadError:
        raise
    except OSError as exc:
        raise ImageReadError(f"cannot open file: {exc.strerror or exc}") from exc
    except Exception as exc:
        raise DicomDecodeError(f"unreadable DICOM: {exc}") from exc
    # force=True turns any bytes into some data set; only a SOP Class makes it DICOM.
    if "SOPClassUID" not in ds and "MediaStorageSOPClassUID" not in ds.file_meta:
        raise NotDicomError("not a DICOM file")
    return ds


def _require_pixels(ds: Dataset) -> None:
    if any(keyword in ds for keyword in _PIXEL_KEYWORDS):
        return
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
    name = UID(sop_class).name if sop_class else "unidentified"
    if "Rows" in ds or "Image Storage" in name:
        raise DicomDecodeError("truncated: no Pixel Data")
    raise UnsupportedDicomError(f"no image: {name} object")


def _transfer_syntax(ds: Dataset) -> UID:
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax:
        return UID(tsyntax)
    # Guessing the encoding of a file without File Meta (pydicom can parse the tags) sometimes
    # yields a plausible image and sometimes a wrong one; a QA pass should flag such files for
    # re-export from the PACS rather than train on a guess.
    raise DicomDecodeError(
        "no Transfer Syntax UID (file has no DICOM File Meta header): pixel encoding unknown"
    )


def _codec(tsyntax: UID) -> str:
    name = tsyntax.name
    return next((c for c in ("JPEG 2000", "JPEG-LS", "JPEG", "RLE") if c in name), "pixel data")


# pydicom tries libjpeg first for JPEG-LS; CharLS (pyjpegls) gives the same pixels 3-4x faster
# (a 1955x1841 radiograph: 87 ms instead of 307 ms), so it is asked for first where installed.
_FASTEST_PLUGIN = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


def _decode(ds: Dataset, tsyntax: UID, index: int) -> tuple[np.ndarray, str]:
    with contextlib.suppress(Exception):  # an unreadable attribute: pydicom reports it below
        if (plain := _native_grey(ds, tsyntax, index)) is not None:
            return plain
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as exc:
        raise UnsupportedDicomError(f"unsupported transfer syntax: {tsyntax.name}") from exc
    fastest = _FASTEST_PLUGIN.get(tsyntax)
    if fastest in decoder.available_plugins:
        with contextlib.suppress(Exception):  # every installed plugin is tried next
            return _as_array(decoder, ds, index, fastest)
    try:
        return _as_array(decoder, ds, index, "")
    except Exception as exc:
        message = str(exc)
        if "less than expected" in message:
            raise DicomDecodeError(f"truncated: {message}") from exc
        raise DicomDecodeError(f"{_codec(tsyntax)} decode failed: {message}") from exc


# Uncompressed syntaxes whose Pixel Data bytes are little-endian integers as they stand.
_NATIVE_LITTLE_ENDIAN = frozenset(
    {ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian}
)
_GREY = ("MONOCHROME1", "MONOCHROME2")
_NATIVE_BITS = (8, 16, 32)
_INTEGER_TAGS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "PixelRepresentation")


def _native_grey(ds: Dataset, tsyntax: UID, index: int) -> tuple[np.ndarray, str] | None:
    """A plain uncompressed greyscale image as ``_decode`` returns it (stored values and
    photometric interpretation), or None to let pydicom's decoder do it.

    pydicom's decoder spends ~0.1 ms per call on setup (options, plugins, validation), twice
    what this takes for the 512 x 512 radiographs the main process decodes between model
    batches. For the common case, one little-endian single-frame greyscale image whose Image
    Pixel attributes pydicom accepts without a warning, this is what pydicom returns: the bytes
    as integers of Bits Allocated, with the bits above Bits Stored cleared (unsigned) or
    sign-extended (signed) by the same left-then-right shift. Anything else (compressed, big
    endian, multi-frame, float or bit-packed pixels, colour, a Pixel Data length pydicom would
    trim, warn about or refuse) is None, so its pixels, warnings and errors stay pydicom's.
    The array may be a read-only view of Pixel Data: the pipeline only reads stored values.
    """
    if (
        tsyntax not in _NATIVE_LITTLE_ENDIAN
        or index != 0
        or _FLOAT_PIXEL_TAGS & ds.keys()
        or ds.get("NumberOfFrames", 1) != 1
        or ds.get("SamplesPerPixel") != 1
        or (photometric := ds.get("PhotometricInterpretation")) not in _GREY
    ):
        return None
    values = [ds.get(keyword) for keyword in _INTEGER_TAGS]
    if any(type(value) is not int for value in values):
        return None
    rows, columns, allocated, stored_bits, signed = values
    data = ds.get("PixelData")
    if (
        not 0 < rows < 2**16
        or not 0 < columns < 2**16
        or allocated not in _NATIVE_BITS
        or not 1 <= stored_bits <= allocated
        or signed not in (0, 1)
        or not isinstance(data, bytes)
    ):
        return None
    size = rows * columns * allocated // 8
    if len(data) not in (size, size + size % 2):  # a trailing pad byte only
        return None
    dtype = np.dtype(f"<{'ui'[signed]}{allocated // 8}")
    stored = np.frombuffer(data, dtype, rows * columns).reshape(rows, columns)
    shift = allocated - stored_bits
    if shift and not _within_bits(stored, stored_bits, signed):
        stored = np.left_shift(stored, shift)
        np.right_shift(stored, shift, out=stored)
    return stored, photometric


def _within_bits(stored: np.ndarray, bits: int, signed: int) -> bool:
    """True when every value is already a ``bits``-bit integer (the unused high bits are zero,
    or copies of the sign bit), i.e. when clearing or sign-extending them changes nothing: the
    usual case, checked with one or two reductions instead of a full shifted copy."""
    if signed:
        limit = 1 << (bits - 1)
        return -limit <= int(stored.min()) and int(stored.max()) < limit
    return int(stored.max()) < 1 << bits


def _as_array(decoder: Decoder, ds: Dataset, index: int, plugin: str) -> tuple[np.ndarray, str]:
    """One frame and the photometric interpretation the decoder produced; ``plugin`` "" lets
    pydicom try every installed one. Decoding one frame (index) avoids decompressing a whole
    multi-frame series; raw=False lets pydicom turn YBR_FULL(_422) into RGB, and the returned
    interpretation tells what came out (e.g. RGB from a YBR_ICT JPEG 2000)."""
    arr, info = decoder.as_array(ds, index=index, decoding_plugin=plugin)
    return arr, str(info["photometric_interpretation"])


def _frame_item(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    # Enhanced multi-frame objects keep rescale and window in functional groups, per frame or
    # shared, instead of at the top level. Most files have neither sequence, which a tag test
    # tells at a fraction of the cost of looking each one up by keyword.
    if not _FUNCTIONAL_GROUPS & ds.keys():
        return None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    groups = [per_frame[index]] if per_frame and index < len(per_frame) else []
    groups += [shared[0]] if shared else []
    for group in groups:
        if sequence := group.get(keyword):
            return sequence[0]
    return None


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        return float(value[0]) if len(value) else None
    return float(value)


def _modality(stored: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(stored, ds).astype(np.float32)
    item = _frame_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = _first(item.get("RescaleSlope"))
    intercept = _first(item.get("RescaleIntercept"))
    # The decoded array is ours, so float32 input is rescaled in place.
    values = stored.astype(np.float32, copy=False)
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept:
        values += intercept
    return values


def _stack(views: list[tuple[np.ndarray, tuple]]) -> tuple[np.ndarray, tuple]:
    pixels = np.stack([p for p, _ in views], axis=-1)
    centers, widths, sources = zip(*(used for _, used in views), strict=True)
    return pixels, (list(centers), list(widths), "+".join(sources))


def _parse_windows(window: Window) -> list[tuple[str, float | None, float | None]]:
    if isinstance(window, str | Mapping):
        return [_parse_window(window)]
    windows = list(window)
    if len(windows) != 3:
        raise ValueError(f"stacked windows go into 3 channels; got {len(windows)} windows")
    return [_parse_window(w) for w in windows]


def _names_presets(window: Window) -> list[str]:
    items = [window] if isinstance(window, str | Mapping) else list(window)
    return [w for w in items if isinstance(w, str) and w in CT_WINDOWS]


def _check_plausible_ct(ds: Dataset, stored: np.ndarray, values: np.ndarray) -> None:
    """Refuse CT pixels no scanner produces: the sign of a codec that decoded garbage silently.

    Nothing in a CT is below air (-1000 HU); scanners pad outside the field of view with values
    around -2000 to -3024. Some corrupt JPEG Lossless streams decode without any error into
    values spread over the whole 16-bit range, which would otherwise train a model on noise.
    """
    if str(ds.get("Modality", "")) != "CT":
        return
    implausible = values < _CT_FLOOR_HU
    padding = ds.get("PixelPaddingValue")
    if padding is not None:
        implausible &= stored != padding
    share = float(implausible.mean())
    if share > _CT_IMPLAUSIBLE_SHARE:
        raise DicomDecodeError(
            f"implausible CT values: {share:.1%} of pixels below {_CT_FLOOR_HU:.0f} HU "
            "(corrupt pixel data that the decoder did not detect)"
        )


def _check_hounsfield(ds: Dataset, window: Window) -> None:
    """CT presets are Hounsfield values: on an MR or radiograph they would window noise."""
    presets = _names_presets(window)
    modality = str(ds.get("Modality", "") or "")
    if presets and modality != "CT":
        raise UnsupportedDicomError(
            f"window {presets[0]!r} is a CT preset in Hounsfield units but Modality is "
            f"{modality or 'missing'}"
        )


def _parse_window(window: SingleWindow) -> tuple[str, float | None, float | None]:
    if isinstance(window, str) and window in CT_WINDOWS:
        center, width = CT_WINDOWS[window]
        return "explicit", center, width
    if isinstance(window, Mapping):
        try:
            center, width = float(window["center"]), float(window["width"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"window mapping needs numeric 'center' and 'width': {exc}") from exc
        if not width > 0:
            raise ValueError(f"window width must be positive, not {width}")
        return "explicit", center, width
    if window not in _AUTO_WINDOWS:
        raise ValueError(
            f"window must be one of {', '.join((*_AUTO_WINDOWS, *CT_WINDOWS))}, a "
            f"{{center, width}} mapping or a list of 3 of those: {window!r}"
        )
    return str(window), None, None


def _voi(
    values: np.ndarray,
    ds: Dataset,
    index: int,
    mode: str,
    center: float | None,
    width: float | None,
) -> tuple[np.ndarray, tuple[float | None, float | None, str]]:
    if mode == "explicit":
        return _linear(values, center, width, "LINEAR"), (center, width, mode)
    if mode == "percentile":
        low, high = (float(v) for v in np.percentile(values, _PERCENTILES))
        return _stretch(values, low, high), ((low + high) / 2, high - low, mode)
    low, high = float(values.min()), float(values.max())
    if mode == "dicom":
        item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
        center, width = _first(item.get("WindowCenter")), _first(item.get("WindowWidth"))
        if center is not None and width is not None and width > 0:
            # A window that misses every pixel (seen in real files) would give a blank image;
            # min/max is the only safe guess then.
            if center - width / 2 < high and center + width / 2 > low:
                function = str(item.get("VOILUTFunction") or "LINEAR").strip().upper()
                if function == "LINEAR" and "PixelData" not in ds:
                    # LINEAR's -0.5/-1 terms assume integer input; on float pixel data a
                    # [0, 1] window with width 1 would collapse into a step.
                    function = "LINEAR_EXACT"
                return _linear(values, center, width, function), (center, width, "file")
            return _stretch(values, low, high), ((low + high) / 2, high - low, "minmax_fallback")
        if ds.get("VOILUTSequence"):
            return _voi_lut(values, ds), (None, None, "voi_lut")
    return _stretch(values, low, high), ((low + high) / 2, high - low, "minmax")


def _linear(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    # PS3.3 C.11.2.1.2 with the output range [0, 1] instead of pydicom's (which maps back onto
    # the stored value range and works in float64). All in place on float32.
    if function == "SIGMOID":
        values -= center
        values *= -4.0 / width
        np.exp(values, out=values)
        values += 1.0
        return np.reciprocal(values, out=values)
    if function == "LINEAR_EXACT":
        scale, offset = 1.0 / width, 0.5 - center / width
    elif width <= 1.0:
        return (values > center - 0.5).astype(np.float32)
    else:
        scale, offset = 1.0 / (width - 1.0), 0.5 - (center - 0.5) / (width - 1.0)
    values *= scale
    values += offset
    return np.clip(values, 0.0, 1.0, out=values)


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        values.fill(0.0)
        return values
    values -= low
    values /= high - low
    return np.clip(values, 0.0, 1.0, out=values)


def _voi_lut(values: np.ndarray, ds: Dataset) -> np.ndarray:
    entries, first, bits = ds.VOILUTSequence[0].LUTDescriptor
    entries = entries or 2**16
    # pydicom parses the LUT (US/OW ambiguity, byte order); feeding it every input value once
    # yields the table, which then maps the float modality values by nearest entry.
    table = apply_voi(np.arange(first, first + entries), ds).astype(np.float32)
    table /= max(2**bits - 1, float(table.max()), 1.0)
    indices = np.rint(values, out=values)
    indices -= first
    np.clip(indices, 0, entries - 1, out=indices)
    return table[indices.astype(np.intp)]


def _presentation_inverse(ds: Dataset) -> bool:
    # DX/MG files state MONOCHROME1 twice (Photometric Interpretation and Presentation LUT Shape
    # INVERSE); that is one inversion, not two.
    return str(ds.get("PresentationLUTShape") or "").strip().upper() == "INVERSE"


def _colour(stored: np.ndarray, ds: Dataset, photometric: str) -> np.ndarray:
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        scale = float(np.iinfo(rgb.dtype).max)
    elif photometric == "RGB":
        rgb = stored
        scale = float(2 ** int(ds.BitsStored) - 1)
    else:
        raise UnsupportedDicomError(f"unsupported colour space: {photometric}")
    pixels = rgb.astype(np.float32)
    pixels /= scale
    return np.clip(pixels, 0.0, 1.0, out=pixels)


def _json_value(value: Any) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, list | tuple | MultiValue):
        return [_json_value(v) for v in value]
    if isinstance(value, float):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _safe_meta(ds: Dataset, tsyntax: UID, n_frames: int, index: int) -> dict[str, Any]:
    meta = {keyword: _json_value(ds.get(keyword)) for keyword in SAFE_TAGS}
    if meta["PixelSpacing"] is None and (item := _frame_item(ds, index, "PixelMeasuresSequence")):
        meta["PixelSpacing"] = _json_value(item.get("PixelSpacing"))
    meta["TransferSyntaxUID"] = str(tsyntax)
    meta["NumberOfFrames"] = n_frames
    meta["frame_index"] = index
    return meta
