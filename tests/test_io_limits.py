"""The pixel budget and the inflate bound: decompression bombs are refused from their headers.

Real files from ../shared/data and pydicom's test files, with their headers changed the way the
bombs found in archives are: a few KB claiming gigapixels, or a deflated data set of a few MB
that inflates to gigabytes.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.filereader import _read_file_meta_info

from medtransfer.io import (
    DEFAULT_MAX_PIXELS,
    ImageTooLargeError,
    is_dicom,
    is_uncompressed_dicom,
    load_image,
    read_dicom,
    read_image,
)

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "dicom" / "corpus"
CT_SMALL = Path(get_testdata_file("CT_small.dcm"))  # 128 x 128
DEFLATED = Path(get_testdata_file("image_dfl.dcm"))  # 512 x 512, Deflated Explicit VR LE


def test_the_default_budget_is_documented() -> None:
    assert DEFAULT_MAX_PIXELS == 134_217_728
    assert f"{DEFAULT_MAX_PIXELS:,}" in (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize(
    "source", ["CT1_JLSN.dcm", "MR2_J2KR.dcm", "693_J2KR.dcm", "emri_small_RLE.dcm"]
)
def test_a_forged_size_is_refused_before_decoding(tmp_path: Path, source: str) -> None:
    ds = pydicom.dcmread(CORPUS / source)
    ds.Rows = ds.Columns = 65535
    ds.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(ImageTooLargeError) as error:
        read_dicom(tmp_path / "bomb.dcm")
    assert str(error.value) == (
        "image too large: 65535 x 65535 pixels x 1 sample(s) x 1 frame(s) = 4,294,836,225 "
        "pixels, over the pixel budget of 134,217,728"
    )


def test_the_budget_is_rows_columns_samples_and_frames_decoded() -> None:
    assert read_dicom(CT_SMALL, max_pixels=128 * 128).pixels.shape == (128, 128)
    with pytest.raises(ImageTooLargeError, match=r"= 16,384 pixels, over the pixel budget of"):
        read_dicom(CT_SMALL, max_pixels=128 * 128 - 1)
    rgb = CORPUS / "JPEGLosslessP14SV1_3s_2f_u_08_08.dcm"  # 768 x 1024 RGB, 2 frames
    assert read_dicom(rgb, max_pixels=768 * 1024 * 3).pixels.shape == (768, 1024, 3)
    with pytest.raises(ImageTooLargeError, match=r"768 x 1024 pixels x 3 sample\(s\) x 2 frame"):
        read_dicom(rgb, frames="all", max_pixels=768 * 1024 * 3)
    frames = CORPUS / "emri_small.dcm"  # 10 frames of 64 x 64
    assert read_dicom(frames, frames="all", max_pixels=64 * 64 * 10).pixels.shape == (10, 64, 64)
    assert read_dicom(frames, max_pixels=None).pixels.shape == (64, 64)


def test_ordinary_images_have_the_same_budget(tmp_path: Path) -> None:
    path = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((50, 100, 3), dtype=np.uint8)).save(path)
    assert read_image(path, max_pixels=50 * 100 * 3).shape == (50, 100, 3)
    with pytest.raises(ImageTooLargeError, match=r"^image too large: 50 x 100 pixels x 3 sample"):
        load_image(path, max_pixels=50 * 100 * 3 - 1)


def forged_png(path: Path, width: int, height: int) -> None:
    """A valid PNG signature and header claiming width x height, with one tiny data chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_a_forged_png_is_refused_before_decoding(tmp_path: Path) -> None:
    forged_png(tmp_path / "wide.png", 20_000, 5_000)  # 100 M: under Pillow's own limit
    with pytest.raises(ImageTooLargeError, match=r"= 100,000,000 pixels, over the pixel budget"):
        read_image(tmp_path / "wide.png", max_pixels=10**7)
    forged_png(tmp_path / "huge.png", 65535, 65535)  # past Pillow's decompression-bomb limit
    with pytest.raises(ImageTooLargeError, match=r"^image too large: .*4294836225 pixels"):
        read_image(tmp_path / "huge.png", max_pixels=None)


def deflated_body_offset(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(132)
        _read_file_meta_info(f)
        return f.tell()


def deflate_bomb(target: Path, padding: int) -> None:
    """image_dfl.dcm with ``padding`` zero bytes of Data Set Trailing Padding (FFFC,FFFC), the
    whole data set deflated again: a ~1 MB file per GiB of padding."""
    raw = DEFLATED.read_bytes()
    start = deflated_body_offset(DEFLATED)
    body = zlib.decompress(raw[start:], -zlib.MAX_WBITS)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(2**24)
    with open(target, "wb") as out:
        out.write(raw[:start])
        out.write(
            compressor.compress(body + struct.pack("<HH2sHI", 0xFFFC, 0xFFFC, b"OB", 0, padding))
        )
        for _ in range(padding // len(chunk)):
            out.write(compressor.compress(chunk))
        out.write(compressor.flush())


def test_a_deflated_file_decodes_and_stays_out_of_the_main_process() -> None:
    assert read_dicom(DEFLATED).pixels.shape == (512, 512)
    assert is_dicom(DEFLATED)
    assert not is_uncompressed_dicom(DEFLATED)  # decoded in a worker, never inflated here


def test_the_inflate_bound_follows_the_budget() -> None:
    # 512 x 512 8-bit pixels plus the header inflate past 4 x 50,000 bytes
    with pytest.raises(ImageTooLargeError, match=r"inflates past 200,000 bytes"):
        read_dicom(DEFLATED, max_pixels=50_000)


def test_a_deflate_bomb_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.dcm"
    deflate_bomb(bomb, 2**30)
    assert bomb.stat().st_size < 2 * 2**20
    assert not is_uncompressed_dicom(bomb)
    probe = (
        "import resource, sys\n"
        "from medtransfer.io import read_dicom\n"
        "try:\n"
        "    read_dicom(sys.argv[1])\n"
        "except Exception as exc:\n"
        "    print(exc)\n"
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the process that forked
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, str(bomb)], capture_output=True, text=True, check=True
    )
    message, peak_kib = result.stdout.splitlines()
    assert message == (
        "image too large: the deflated data set inflates past 536,870,912 bytes "
        "(4 bytes per pixel of the pixel budget)"
    )
    assert int(peak_kib) < 400 * 1024  # pydicom would have held the whole GiB, twice
