"""DICOM pixel pipeline on real files from ../shared/data and the pydicom wheel's test files.

Expectations are exact: shapes from the manifest, pixel values against pydicom's own LUT and
window functions or the DICOM formulas, and equivalence (within 1e-3) between files that differ
only in transfer syntax, polarity or rescale representation.
"""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.pixels.processing import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi,
    apply_windowing,
)
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from medtransfer.io import (
    DicomDecodeError,
    ImageReadError,
    NotDicomError,
    UnsupportedDicomError,
    is_dicom,
    load_image,
    patient_key,
    read_dicom,
)
from medtransfer.io import dicom as dicom_module
from medtransfer.io.dicom import SAFE_TAGS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = DATA / "dicom" / "corpus"
BROKEN = DATA / "dicom" / "broken"
NIH = CORPUS / "NIH_CXR14_DX_NoFinding_1.3.6.1.4.1.11129.5.5.1105.dcm"
TOL = 1e-3

with open(DATA / "dicom" / "MANIFEST.csv", newline="") as _f:
    MANIFEST = {row["file"]: row for row in csv.DictReader(_f)}
CORPUS_ROWS = [row for name, row in MANIFEST.items() if name.startswith("corpus/")]


def _wheel(name: str) -> str:
    return get_testdata_file(name)


def _save_native(ds: pydicom.Dataset, stored: np.ndarray, path: Path, **tags: object) -> Path:
    """Write ``ds`` uncompressed with new stored values and overridden tags."""
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds["PixelData"].VR = "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert float(np.abs(a - b).max()) <= TOL


def _stretch(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


# --- the corpus ---------------------------------------------------------------------------------


def test_corpus_matches_manifest() -> None:
    on_disk = sorted(p.name for p in CORPUS.glob("*.dcm"))
    assert len(on_disk) == 39
    assert on_disk == sorted(row["file"].removeprefix("corpus/") for row in CORPUS_ROWS)


@pytest.mark.parametrize("row", CORPUS_ROWS, ids=lambda row: row["file"].removeprefix("corpus/"))
def test_corpus_file_decodes(row: dict[str, str]) -> None:
    image = read_dicom(DATA / "dicom" / row["file"])
    rows, columns = int(row["Rows"]), int(row["Columns"])
    colour = row["SamplesPerPixel"] == "3" or row["PhotometricInterpretation"] == "PALETTE COLOR"
    assert image.pixels.shape == ((rows, columns, 3) if colour else (rows, columns))
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    assert image.pixels.max() - image.pixels.min() > 0.5  # not blank or saturated
    meta = image.meta
    assert meta["Rows"] == rows and meta["Columns"] == columns
    assert meta["PhotometricInterpretation"] == row["PhotometricInterpretation"]
    assert meta["TransferSyntaxUID"] == row["transfer_syntax"].split(" ")[0]
    assert meta["NumberOfFrames"] == int(row["NumberOfFrames"] or 1)
    assert (meta["Modality"] or "") == row["Modality"]
    assert meta["window_source"] == _expected_window_source(row, colour)
    json.dumps(meta)


def _expected_window_source(row: dict[str, str], colour: bool) -> str:
    name = row["file"].removeprefix("corpus/")
    if colour:
        return "none"
    if name == "JPEG2KLossless_1s_1f_u_16_16.dcm":
        return "minmax_fallback"
    # eCT and the parametric map keep their window in functional groups, not at the top level
    if row["WindowCenter"] or name in ("eCT_Supplemental.dcm", "parametric_map_float.dcm"):
        return "file"
    return "voi_lut" if row["has_VOILUTSequence"] == "True" else "minmax"


# --- pixel values against references -------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [CORPUS / "693_UNCI.dcm", CORPUS / "MR-SIEMENS-DICOM-WithOverlays.dcm", _wheel("MR_small.dcm")],
    ids=lambda p: Path(p).name,
)
def test_file_window_matches_pydicom_windowing(path: Path) -> None:
    # pydicom maps the window onto the stored value range; rescaled to [0, 1] it must agree.
    ds = pydicom.dcmread(path)
    reference = apply_windowing(apply_modality_lut(ds.pixel_array, ds), ds)
    bits = int(ds.BitsStored)
    low = -(2 ** (bits - 1)) if ds.PixelRepresentation else 0
    high = low + 2**bits - 1
    slope, intercept = float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))
    reference = (reference - (low * slope + intercept)) / ((high - low) * slope)
    image = read_dicom(path)
    _close(image.pixels, reference.astype(np.float32))
    center = ds.WindowCenter[0] if ds["WindowCenter"].VM > 1 else ds.WindowCenter
    assert image.meta["window_center"] == float(center)
    assert image.meta["window_source"] == "file"


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(tmp_path: Path, function: str) -> None:
    ds = pydicom.dcmread(_wheel("MR_small.dcm"))  # signed 16-bit, WC 600 / WW 1600, no rescale
    ds.VOILUTFunction = function
    ds.save_as(tmp_path / "twin.dcm")
    reference = (apply_windowing(ds.pixel_array, ds) + 32768) / 65535
    _close(read_dicom(tmp_path / "twin.dcm").pixels, reference.astype(np.float32))


def test_explicit_hounsfield_window_at_known_pixels() -> None:
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")
    hu = ds.pixel_array.astype(np.float64) - 1024.0  # RescaleSlope 1, RescaleIntercept -1024
    image = read_dicom(CORPUS / "693_UNCI.dcm", window={"center": 40, "width": 400})
    # PS3.3 C.11.2.1.2 LINEAR, output range [0, 1]
    expected = np.clip((hu - 39.5) / 399.0 + 0.5, 0.0, 1.0)
    _close(image.pixels, expected.astype(np.float32))
    assert image.pixels[0, 0] == 0.0  # air outside the head
    y, x = np.unravel_index(np.argmax(hu), hu.shape)
    assert image.pixels[y, x] == 1.0  # densest bone
    assert (image.meta["window_center"], image.meta["window_width"]) == (40.0, 400.0)
    assert image.meta["window_source"] == "explicit"


def test_window_modes() -> None:
    path = CORPUS / "693_UNCI.dcm"
    hu = pydicom.dcmread(path).pixel_array.astype(np.float64) - 1024.0
    minmax = read_dicom(path, window="minmax")
    _close(minmax.pixels, _stretch(hu).astype(np.float32))
    assert minmax.meta["window_width"] == hu.max() - hu.min()
    percentile = read_dicom(path, window="percentile")
    low, high = np.percentile(hu, [0.5, 99.5])
    _close(percentile.pixels, np.clip((hu - low) / (high - low), 0, 1).astype(np.float32))
    assert percentile.meta["window_source"] == "percentile"


def test_voi_lut_sequence_matches_pydicom() -> None:
    ds = pydicom.dcmread(CORPUS / "vlut_04.dcm")
    reference = apply_voi(ds.pixel_array, ds) / 65535.0  # LUT Descriptor: 16 bits per entry
    image = read_dicom(CORPUS / "vlut_04.dcm")
    _close(image.pixels, reference.astype(np.float32))
    assert image.meta["window_source"] == "voi_lut"


def test_modality_lut_sequence_equals_its_rescaled_twin(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CORPUS / "mlut_18.dcm")
    values = apply_modality_lut(ds.pixel_array, ds)
    image = read_dicom(CORPUS / "mlut_18.dcm")
    _close(image.pixels, _stretch(values).astype(np.float32))
    del ds.ModalityLUTSequence
    twin = _save_native(
        ds, values.astype(np.uint16), tmp_path / "twin.dcm", PixelRepresentation=0, BitsStored=16
    )
    _close(read_dicom(twin).pixels, image.pixels)


def test_enhanced_ct_uses_functional_group_rescale_and_window() -> None:
    ds = pydicom.dcmread(CORPUS / "eCT_Supplemental.dcm")
    hu = ds.pixel_array[0].astype(np.float64) - 1024.0  # shared PixelValueTransformation
    image = read_dicom(CORPUS / "eCT_Supplemental.dcm")
    _close(image.pixels, np.clip((hu - 48.5) / 101.0 + 0.5, 0, 1).astype(np.float32))
    assert (image.meta["window_center"], image.meta["window_width"]) == (49.0, 102.0)
    assert image.meta["PixelSpacing"] == [0.388672, 0.388672]


def test_float_pixel_data_keeps_its_values() -> None:
    # WC 0.5 / WW 1 on floats: LINEAR's integer terms would turn this into a step function.
    ds = pydicom.dcmread(CORPUS / "parametric_map_float.dcm")
    _close(read_dicom(CORPUS / "parametric_map_float.dcm").pixels, ds.pixel_array)


def test_window_that_misses_all_pixels_falls_back_to_minmax() -> None:
    # Stored values 32744..65535 with WC 2725 / WW 5310: the file's window would be all white.
    path = CORPUS / "JPEG2KLossless_1s_1f_u_16_16.dcm"
    image = read_dicom(path)
    assert image.meta["window_source"] == "minmax_fallback"
    _close(image.pixels, _stretch(pydicom.dcmread(path).pixel_array).astype(np.float32))


# --- polarity -------------------------------------------------------------------------------------


def test_monochrome1_chest_shows_bone_bright() -> None:
    pixels = read_dicom(CORPUS / "RG1_J2KI.dcm").pixels
    h, w = pixels.shape
    spine = pixels[h // 2 - 100 : h // 2 + 100, w // 2 - 60 : w // 2 + 60].mean()
    left_lung = pixels[h // 3 : h // 3 + 200, w // 4 - 100 : w // 4 + 100].mean()
    right_lung = pixels[h // 3 : h // 3 + 200, 3 * w // 4 - 100 : 3 * w // 4 + 100].mean()
    assert spine > left_lung + 0.15 and spine > right_lung + 0.15


@pytest.mark.parametrize(
    ("name", "bits", "extra"),
    [
        ("RG3_J2KR.dcm", 10, {}),
        # MONOCHROME1 + PresentationLUTShape INVERSE is one inversion, not two
        ("966_fixed.dcm", 12, {"PresentationLUTShape": "IDENTITY"}),
    ],
)
@pytest.mark.parametrize("window", ["dicom", "minmax"])
def test_monochrome1_equals_inverted_monochrome2_twin(
    tmp_path: Path, name: str, bits: int, extra: dict[str, str], window: str
) -> None:
    ds = pydicom.dcmread(CORPUS / name)
    maximum = 2**bits - 1
    stored = maximum - ds.pixel_array.astype(np.int32)
    center = float(ds.WindowCenter)
    twin = _save_native(
        ds,
        stored.astype(np.uint16),
        tmp_path / "mono2.dcm",
        PhotometricInterpretation="MONOCHROME2",
        WindowCenter=maximum + 1 - center,  # mirrors the LINEAR window onto the inverted values
        **extra,
    )
    _close(read_dicom(twin, window=window).pixels, read_dicom(CORPUS / name, window=window).pixels)


def test_monochrome1_is_the_inverse_of_the_same_values_as_monochrome2(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CORPUS / "RG3_J2KR.dcm")
    twin = _save_native(
        ds, ds.pixel_array, tmp_path / "relabelled.dcm", PhotometricInterpretation="MONOCHROME2"
    )
    _close(read_dicom(twin).pixels, 1.0 - read_dicom(CORPUS / "RG3_J2KR.dcm").pixels)


# --- equivalence across encodings -----------------------------------------------------------------

EMRI = ["emri_small_RLE", "emri_small_big_endian", "emri_small_jpeg_2k_lossless"]
EMRI += ["emri_small_jpeg_ls_lossless"]


@pytest.mark.parametrize("variant", EMRI)
@pytest.mark.parametrize("frames", ["first", "middle"])
def test_transfer_syntax_variants_agree(variant: str, frames: str) -> None:
    reference = read_dicom(CORPUS / "emri_small.dcm", frames=frames)
    image = read_dicom(CORPUS / f"{variant}.dcm", frames=frames)
    _close(image.pixels, reference.pixels)
    assert image.meta["frame_index"] == reference.meta["frame_index"]


@pytest.mark.parametrize(
    "variant",
    ["RLE", "bigendian", "expb", "implicit", "jp2klossless", "jpeg_ls_lossless", "padded"],
)
def test_pydicom_mr_small_variants_agree(variant: str) -> None:
    reference = read_dicom(_wheel("MR_small.dcm")).pixels
    _close(read_dicom(_wheel(f"MR_small_{variant}.dcm")).pixels, reference)


@pytest.mark.parametrize(
    ("a", "b"),
    [("RG2_JPLL.dcm", "RG2_JLSL.dcm"), ("MR2_J2KR.dcm", "JPEGLossless_1s_1f_u_16_12.dcm")],
)
def test_lossless_codecs_agree_on_real_radiographs(a: str, b: str) -> None:
    _close(read_dicom(CORPUS / a).pixels, read_dicom(CORPUS / b).pixels)


@pytest.mark.parametrize("syntax", [RLELossless, DeflatedExplicitVRLittleEndian])
def test_reencoded_ct_agrees(tmp_path: Path, syntax: str) -> None:
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")
    if syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(tmp_path / "twin.dcm")
    image = read_dicom(tmp_path / "twin.dcm")
    assert image.meta["TransferSyntaxUID"] == syntax
    _close(image.pixels, read_dicom(CORPUS / "693_UNCI.dcm").pixels)


@pytest.mark.parametrize(
    ("factor", "offset"),
    [(2, 0), (1, 1000)],
    ids=["slope-0.5", "intercept-shift"],
)
@pytest.mark.parametrize("window", ["dicom", "percentile", "minmax"])
def test_rescale_representations_agree(
    tmp_path: Path, factor: int, offset: int, window: str
) -> None:
    # stored' = factor * stored + offset with slope' = 1/factor and intercept' chosen so that the
    # Hounsfield values are unchanged.
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")
    stored = ds.pixel_array.astype(np.int32) * factor + offset
    twin = _save_native(
        ds,
        stored.astype(np.int16),
        tmp_path / "twin.dcm",
        BitsStored=16,
        HighBit=15,
        RescaleSlope=1 / factor,
        RescaleIntercept=-1024 - offset / factor,
    )
    _close(
        read_dicom(twin, window=window).pixels,
        read_dicom(CORPUS / "693_UNCI.dcm", window=window).pixels,
    )


# --- frames ---------------------------------------------------------------------------------------


def test_middle_frame() -> None:
    stack = pydicom.dcmread(CORPUS / "emri_small.dcm").pixel_array
    image = read_dicom(CORPUS / "emri_small.dcm", frames="middle")
    assert image.meta["frame_index"] == 5 and image.meta["NumberOfFrames"] == 10
    _close(image.pixels, _stretch(stack[5]).astype(np.float32))
    first = read_dicom(CORPUS / "emri_small.dcm").pixels
    assert np.abs(first - image.pixels).mean() > 0.01


def test_middle_frame_of_colour_pair() -> None:
    path = CORPUS / "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm"
    stack = pydicom.dcmread(path).pixel_array
    image = read_dicom(path, frames="middle")
    _close(image.pixels, stack[1] / np.float32(255))


# --- colour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "SC_rgb_dcmtk_+eb+cy+n1.dcm",  # JPEG baseline YBR_FULL
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG baseline YBR_FULL_422
        "SC_ybr_full_422_uncompressed.dcm",
        "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless RGB
    ],
)
def test_ybr_and_rgb_encodings_give_the_same_rgb(name: str) -> None:
    reference = read_dicom(_wheel("SC_rgb_rle.dcm")).pixels
    image = read_dicom(_wheel(name)).pixels
    assert image.shape == reference.shape == (100, 100, 3)
    assert float(np.abs(image - reference).mean()) < 0.02  # lossy JPEG; unconverted YBR ~ 0.3


def test_ybr_ict_ultrasound_is_rgb() -> None:
    # Ultrasound is mostly grey: after YBR_ICT -> RGB the three channels agree.
    pixels = read_dicom(CORPUS / "US1_J2KI.dcm").pixels
    assert np.median(np.abs(pixels[..., 0] - pixels[..., 1])) < 0.02


@pytest.mark.parametrize(
    "path", [CORPUS / "OBXXXX1A_rle.dcm", CORPUS / "gdcm-US-ALOKA-16.dcm"], ids=lambda p: p.name
)
def test_palette_colour_matches_pydicom_lut(path: Path) -> None:
    ds = pydicom.dcmread(path)
    reference = apply_color_lut(ds.pixel_array, ds) / 65535.0  # 16-bit LUT entries
    _close(read_dicom(path).pixels, reference.astype(np.float32))


def test_sixteen_bit_rgb_scales_by_bit_depth() -> None:
    _close(
        read_dicom(_wheel("SC_rgb_rle_16bit.dcm")).pixels,
        read_dicom(_wheel("SC_rgb_rle.dcm")).pixels,
    )


# --- files without File Meta ----------------------------------------------------------------------


def test_missing_transfer_syntax_is_an_error_not_a_guess(tmp_path: Path) -> None:
    with pytest.raises(DicomDecodeError, match="no Transfer Syntax UID"):
        read_dicom(BROKEN / "OT-PAL-8-face.dcm")
    for source, implicit in (
        (CORPUS / "emri_small_RLE.dcm", False),
        (_wheel("MR_small.dcm"), True),
    ):
        ds = pydicom.dcmread(source)
        ds.file_meta = FileMetaDataset()
        ds.preamble = None
        ds.save_as(tmp_path / "bare.dcm", enforce_file_format=False, implicit_vr=implicit)
        assert is_dicom(tmp_path / "bare.dcm")
        with pytest.raises(DicomDecodeError, match="no Transfer Syntax UID"):
            read_dicom(tmp_path / "bare.dcm")


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "error", "reason"),
    [
        (BROKEN / "966.dcm", DicomDecodeError, "JPEG 2000 decode failed"),
        (BROKEN / "RG2_JPLY.dcm", DicomDecodeError, "JPEG decode failed"),
        (
            BROKEN / "emri_small_jpeg_2k_lossless_too_short.dcm",
            DicomDecodeError,
            "truncated: no Pixel Data",
        ),
        (BROKEN / "not_dicom_jpeg_B1.JPG", NotDicomError, "not a DICOM file"),
        (_wheel("MR_truncated.dcm"), DicomDecodeError, "truncated"),
        (_wheel("JPEG-lossy.dcm"), DicomDecodeError, "JPEG decode failed"),
        (_wheel("rtplan.dcm"), UnsupportedDicomError, "no image: RT Plan Storage object"),
        (_wheel("test-SR.dcm"), UnsupportedDicomError, "no image: Comprehensive SR Storage"),
        (_wheel("waveform_ecg.dcm"), UnsupportedDicomError, "no image: 12-lead ECG"),
        (
            Path(_wheel("DICOMDIR")),
            UnsupportedDicomError,
            "no image: Media Storage Directory Storage object",
        ),
        (_wheel("badVR.dcm"), DicomDecodeError, "1A"),
        (_wheel("crayons.icc"), NotDicomError, "not a DICOM file"),
    ],
    ids=lambda v: Path(v).name if isinstance(v, str | Path) else None,
)
def test_bad_input_raises_one_line_reason(path: Path, error: type, reason: str) -> None:
    with pytest.raises(error) as caught:
        read_dicom(path)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message
    with pytest.raises(ImageReadError):
        load_image(path)


def test_every_broken_file_raises() -> None:
    broken = sorted(BROKEN.iterdir())
    assert len(broken) == 6
    for path in broken:
        with pytest.raises(ImageReadError):
            load_image(path)


def test_silently_corrupt_jpeg_lossless_ct_is_refused() -> None:
    """pydicom and libjpeg decode it without a word; the Hounsfield values give it away."""
    with pytest.raises(DicomDecodeError, match=r"implausible CT values: 2\d\.\d% of pixels"):
        read_dicom(BROKEN / "JPEGLossless_1s_1f_i_16_16_bad.dcm")


def test_ct_padding_value_is_not_implausible(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")
    pixels = ds.pixel_array.copy()
    pixels[:40] = -8192  # a padded border far below air (14-bit signed minimum)
    ds.PixelData = pixels.tobytes()
    ds.save_as(tmp_path / "padded.dcm")
    with pytest.raises(DicomDecodeError, match="implausible CT values"):
        read_dicom(tmp_path / "padded.dcm")
    ds.PixelPaddingValue = -8192
    ds.save_as(tmp_path / "padded.dcm")
    assert read_dicom(tmp_path / "padded.dcm").pixels.shape == (512, 512)


def test_non_dicom_files(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("this is not a DICOM file\n")
    with pytest.raises(NotDicomError, match="empty file"):
        read_dicom(tmp_path / "empty.dcm")
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_dicom(tmp_path / "notes.dcm")
    with pytest.raises(ImageReadError, match="cannot open file"):
        read_dicom(tmp_path / "missing.dcm")
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_dicom(DATA / "cxr_png" / "00000003_000.png")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": "auto"}, "window must be"),
        ({"window": {"center": 40}}, "center"),
        ({"window": {"center": 40, "width": 0}}, "positive"),
        ({"frames": "last"}, "frames must be"),
    ],
)
def test_bad_arguments_are_value_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_dicom(CORPUS / "emri_small.dcm", **kwargs)


# --- the uncompressed fast path ------------------------------------------------------------------

# Every file the tests hand read_dicom: the corpus, the broken files and pydicom's test files.
EVERY_FILE = sorted(map(str, [*CORPUS.iterdir(), *BROKEN.iterdir()])) + sorted(get_testdata_files())
# Plain uncompressed greyscale images the fast path must take, so that comparing it with
# pydicom's decoder never passes by comparing nothing: signed and unsigned, 8, 16 and 32 bits,
# MONOCHROME1, Implicit VR and deflated.
MUST_BE_FAST = {
    "693_UNCI.dcm",
    "MR-SIEMENS-DICOM-WithOverlays.dcm",
    NIH.name,
    "CT_small.dcm",
    "MR_small_implicit.dcm",
    "image_dfl.dcm",
    "rtdose_1frame.dcm",
    "6154",
}


def _outcome(path: str | Path, **kwargs: object) -> tuple:
    """What read_dicom gives: (pixels, metadata), or (error type, its line)."""
    try:
        image = read_dicom(path, **kwargs)
    except ImageReadError as exc:
        return type(exc), str(exc)
    return image.pixels, image.meta


def _assert_same_outcome(fast: tuple, slow: tuple) -> None:
    if isinstance(slow[0], np.ndarray):
        assert isinstance(fast[0], np.ndarray) and fast[0].dtype == slow[0].dtype
        assert np.array_equal(fast[0], slow[0])
    else:
        assert fast[0] is slow[0]
    assert fast[1] == slow[1]


def _pydicom_decodes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dicom_module, "_native_grey", lambda ds, tsyntax, index: None)


def test_fast_path_reads_every_file_as_pydicom_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the fast path takes a file, its stored values are pydicom's decoder's (values,
    dtype, photometric) and read_dicom's pixels and metadata do not change; everywhere else it
    declines and read_dicom runs the code it always ran. Only the taken files are decoded."""
    taken: list[str] = []
    for path in EVERY_FILE:
        try:
            ds = dicom_module._read_dataset(path)
            tsyntax = dicom_module._transfer_syntax(ds)
        except ImageReadError:
            continue
        assert dicom_module._native_grey(ds, tsyntax, 1) is None  # first frames only
        if (plain := dicom_module._native_grey(ds, tsyntax, 0)) is None:
            continue
        stored, photometric = dicom_module._as_array(get_decoder(tsyntax), ds, 0, "")
        assert plain[0].dtype == stored.dtype and np.array_equal(plain[0], stored), path
        assert plain[1] == photometric
        taken.append(path)
    assert {Path(path).name for path in taken} >= MUST_BE_FAST
    fast = [(_outcome(p), _outcome(p, frames="all", window="minmax")) for p in taken]
    _pydicom_decodes(monkeypatch)
    for path, (image, stack) in zip(taken, fast, strict=True):
        _assert_same_outcome(image, _outcome(path))
        _assert_same_outcome(stack, _outcome(path, frames="all", window="minmax"))


def _unused_bits_set(stored: np.ndarray, bits: int) -> np.ndarray:
    """``stored`` with random garbage in the bits above ``bits`` (PS3.5 8.1.1 lets writers
    leave anything there)."""
    raw = stored.view(f"u{stored.itemsize}")
    garbage = np.random.default_rng(0).integers(0, 2**16, raw.shape).astype(raw.dtype)
    return (raw & ((1 << bits) - 1)) | (garbage << bits)


@pytest.mark.parametrize("signed", [True, False])
def test_garbage_in_unused_high_bits_is_ignored(
    tmp_path: Path, signed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path clears (unsigned) or sign-extends (signed) what lies above Bits Stored, as
    pydicom does: garbage there gives the clean file's pixels, with either decoder."""
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")  # signed, 14 of 16 bits
    stored = ds.pixel_array if signed else (ds.pixel_array + 4096).astype(np.uint16)
    tags = {} if signed else {"PixelRepresentation": 0, "RescaleIntercept": -5120}
    clean = _save_native(ds, stored, tmp_path / "clean.dcm", **tags)
    dirty = _save_native(ds, _unused_bits_set(stored, 14), tmp_path / "dirty.dcm", **tags)
    assert dirty.read_bytes() != clean.read_bytes()
    expected = read_dicom(clean).pixels
    assert np.array_equal(read_dicom(dirty).pixels, expected)
    _pydicom_decodes(monkeypatch)
    assert np.array_equal(read_dicom(dirty).pixels, expected)


@pytest.mark.parametrize(
    ("values", "signed"),
    [
        ([0, 2**14 - 1], 0),
        ([0, 2**14], 0),
        ([2**16 - 1], 0),
        ([-(2**13), 2**13 - 1], 1),
        ([-(2**13) - 1, 0], 1),
        ([0, 2**13], 1),
        ([2**15 - 1], 1),
        ([-(2**15)], 1),
    ],
)
def test_the_unused_bits_check_is_exact(values: list[int], signed: int) -> None:
    """Skipping the shift is only right when it would change nothing, at the limits too."""
    stored = np.array(values, dtype=f"{'ui'[signed]}2")
    shifted = np.right_shift(np.left_shift(stored, 2), 2)  # pydicom's, for 14 of 16 bits
    assert dicom_module._within_bits(stored, 14, signed) == np.array_equal(shifted, stored)


@pytest.mark.parametrize(
    "variant",
    ["odd_8_bit", "excess_bytes", "short_by_two", "implicit_vr", "monochrome1", "32_bit", "frames"],
)
def test_edge_cases_read_as_pydicom_reads_them(
    tmp_path: Path, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lengths pydicom pads, trims or refuses, other encodings and bit depths: the same pixels,
    metadata or error line with the fast path as with pydicom's decoder."""
    ds = pydicom.dcmread(CORPUS / "693_UNCI.dcm")
    stored, path = ds.pixel_array, tmp_path / f"{variant}.dcm"
    if variant == "odd_8_bit":  # 511 x 511 bytes and a pad byte
        small = (stored[:511, :511] // 64 + 64).astype(np.uint8)
        tags = {"Rows": 511, "Columns": 511, "BitsAllocated": 8, "BitsStored": 7, "HighBit": 6}
        _save_native(ds, small, path, PixelRepresentation=0, **tags)
    elif variant in ("excess_bytes", "short_by_two"):
        _save_native(ds, stored, path)
        ds = pydicom.dcmread(path)
        data = ds.PixelData
        ds.PixelData = data + bytes(4) if variant == "excess_bytes" else data[:-2]
        ds.save_as(path)
    elif variant == "implicit_vr":
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    elif variant == "monochrome1":
        _save_native(ds, stored, path, PhotometricInterpretation="MONOCHROME1")
    elif variant == "32_bit":
        _save_native(ds, stored.astype(np.int32), path, BitsAllocated=32, HighBit=31)
    else:  # two frames: the fast path is for single frames
        _save_native(ds, np.stack([stored, stored[::-1]]), path, NumberOfFrames=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the excess bytes
        fast = _outcome(path, frames="middle")
        _pydicom_decodes(monkeypatch)
        _assert_same_outcome(fast, _outcome(path, frames="middle"))
    if variant == "short_by_two":
        assert fast[0] is DicomDecodeError and fast[1].startswith("truncated")
    else:
        assert isinstance(fast[0], np.ndarray)


# --- is_dicom -------------------------------------------------------------------------------------


def test_is_dicom_by_content(tmp_path: Path) -> None:
    disguised = tmp_path / "scan.png"
    disguised.write_bytes((CORPUS / "emri_small.dcm").read_bytes())
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "notes.dcm").write_text("hello\n")
    assert is_dicom(disguised)
    assert is_dicom(NIH) and is_dicom(_wheel("DICOMDIR"))
    assert is_dicom(BROKEN / "OT-PAL-8-face.dcm")  # no preamble, no File Meta
    assert not is_dicom(DATA / "cxr_png" / "00000003_000.png")
    assert not is_dicom(BROKEN / "not_dicom_jpeg_B1.JPG")
    assert not is_dicom(tmp_path / "empty.dcm")
    assert not is_dicom(tmp_path / "notes.dcm")
    assert not is_dicom(tmp_path / "missing.dcm")


# --- privacy --------------------------------------------------------------------------------------

PHI = ["PatientName", "PatientID", "PatientBirthDate", "PatientAddress", "AccessionNumber"]
PHI += ["InstitutionName", "ReferringPhysicianName", "StudyDescription", "OtherPatientIDs"]


def test_meta_holds_no_phi() -> None:
    ds = pydicom.dcmread(NIH)
    assert ds.PatientName == "Covid0000" and ds.StudyDescription == "No Finding"
    meta = read_dicom(NIH).meta
    assert not set(PHI) & set(meta)
    assert set(meta) == {*SAFE_TAGS, "TransferSyntaxUID", "NumberOfFrames", "frame_index"} | {
        "window_center",
        "window_width",
        "window_source",
    }
    text = json.dumps(meta)
    assert "Covid0000" not in text and "No Finding" not in text
    assert meta["SOPInstanceUID"] == ds.SOPInstanceUID
    assert meta["Modality"] == "DX"


def test_patient_key() -> None:
    key = patient_key(NIH, salt="site-a")
    assert len(key) == 16 and int(key, 16) >= 0
    assert key == patient_key(pydicom.dcmread(NIH), salt="site-a")
    assert key != patient_key(NIH, salt="site-b")
    assert "Covid0000" not in key
    with pytest.raises(ValueError, match="salt"):
        patient_key(NIH, salt="")
    with pytest.raises(ImageReadError, match="no PatientID"):
        patient_key(CORPUS / "emri_small.dcm", salt="site-a")  # PatientID is empty


def test_io_does_not_import_tensorflow() -> None:
    code = "import sys, medtransfer.io; sys.exit(bool({'tensorflow', 'keras'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- CT presets and stacked windows ---------------------------------------------------------------


def test_ct_presets_are_hounsfield_windows() -> None:
    path = CORPUS / "693_UNCI.dcm"
    lung = read_dicom(path, window="lung")
    assert np.array_equal(
        lung.pixels, read_dicom(path, window={"center": -600, "width": 1500}).pixels
    )
    assert (lung.meta["window_center"], lung.meta["window_width"]) == (-600.0, 1500.0)


def test_three_windows_stack_into_three_channels() -> None:
    path = CORPUS / "693_UNCI.dcm"
    names = ["lung", "mediastinum", "bone"]
    stacked = read_dicom(path, window=names)
    assert stacked.pixels.shape == (512, 512, 3) and stacked.pixels.dtype == np.float32
    for channel, name in enumerate(names):
        assert np.array_equal(stacked.pixels[..., channel], read_dicom(path, window=name).pixels)
    assert stacked.meta["window_center"] == [-600.0, 50.0, 400.0]
    assert not np.array_equal(stacked.pixels[..., 0], stacked.pixels[..., 2])


def test_ct_preset_on_a_non_ct_image_is_refused() -> None:
    with pytest.raises(UnsupportedDicomError, match=r"'brain' is a CT preset .* Modality is MR"):
        read_dicom(_wheel("MR_small.dcm"), window="brain")
    with pytest.raises(ValueError, match="3 channels"):
        read_dicom(CORPUS / "693_UNCI.dcm", window=["lung", "bone"])
    with pytest.raises(ValueError, match="window must be one of"):
        read_dicom(CORPUS / "693_UNCI.dcm", window="lungs")


def test_all_frames_stack_each_through_its_own_pipeline() -> None:
    path = CORPUS / "emri_small.dcm"
    stack = read_dicom(path, frames="all").pixels
    assert stack.shape == (10, 64, 64) and stack.dtype == np.float32
    assert np.array_equal(stack[0], read_dicom(path, frames="first").pixels)
    assert np.array_equal(stack[5], read_dicom(path, frames="middle").pixels)
    assert not np.array_equal(stack[0], stack[9])
    single = read_dicom(CORPUS / "693_UNCI.dcm", frames="all").pixels
    assert single.shape == (1, 512, 512)


@pytest.mark.parametrize("name", ["RG1_JLSN.dcm", "RG2_JLSL.dcm", "CT1_JLSN.dcm"])
def test_jpeg_ls_is_read_by_charls_with_libjpeg_s_pixels(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CharLS (pyjpegls) is asked first for JPEG-LS (3-4x faster than libjpeg, which pydicom
    prefers); the pixels must be libjpeg's exactly, and a CharLS failure falls back to it."""
    asked: list[str] = []
    real = dicom_module._as_array

    def spy(decoder, ds, index, plugin):
        asked.append(plugin)
        return real(decoder, ds, index, plugin)

    monkeypatch.setattr(dicom_module, "_as_array", spy)
    fast = read_dicom(CORPUS / name).pixels
    assert asked == ["pyjpegls"]

    def libjpeg_only(decoder, ds, index, plugin):
        asked.append(plugin)
        if plugin == "pyjpegls":
            raise RuntimeError("CharLS refused it")
        return real(decoder, ds, index, "pylibjpeg" if plugin == "" else plugin)

    monkeypatch.setattr(dicom_module, "_as_array", libjpeg_only)
    assert np.array_equal(read_dicom(CORPUS / name).pixels, fast)
    assert asked == ["pyjpegls", "pyjpegls", ""]


def test_pydicom_messages_never_reach_the_applications_log() -> None:
    """bad_sequence.dcm makes pydicom warn with an element's value; an application that sends
    its root logger to files must not receive it (values can be names or IDs)."""
    received: list[logging.LogRecord] = []

    class Application(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            received.append(record)

    root, handler = logging.getLogger(), Application(logging.DEBUG)
    root.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image = load_image(CORPUS / "bad_sequence.dcm")
            logging.getLogger("medtransfer.test").warning("the application's own message")
    finally:
        root.removeHandler(handler)
    assert image.pixels.size > 0
    assert [r.name for r in received] == ["medtransfer.test"]
