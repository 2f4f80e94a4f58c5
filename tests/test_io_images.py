"""read_image on Pillow-written fixtures and the NIH PNGs; load_image's dispatch by content."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medtransfer.io import ImageReadError, LoadedImage, load_image, read_dicom, read_image

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
PNGS = sorted((DATA / "cxr_png").glob("*.png"))
RNG = np.random.default_rng(0)


def _ramp(dtype: type, maximum: int, shape: tuple[int, ...] = (6, 8)) -> np.ndarray:
    return np.linspace(0, maximum, num=int(np.prod(shape))).round().astype(dtype).reshape(shape)


def _save(array: np.ndarray, path: Path, mode: str | None = None, **kwargs: object) -> Path:
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(path, **kwargs)
    return path


def _check(pixels: np.ndarray, shape: tuple[int, ...]) -> None:
    assert pixels.shape == shape
    assert pixels.dtype == np.float32
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0


@pytest.mark.parametrize("path", PNGS, ids=lambda p: p.name)
def test_nih_pngs(path: Path) -> None:
    pixels = read_image(path)
    _check(pixels, (1024, 1024))
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(path), np.float32) / 255)
    assert pixels.std() > 0.1


def test_cxr_png_set_is_complete() -> None:
    assert len(PNGS) == 7


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_eight_and_sixteen_bit_grey(tmp_path: Path, suffix: str) -> None:
    eight, sixteen = _ramp(np.uint8, 255), _ramp(np.uint16, 65535)
    pixels8 = read_image(_save(eight, tmp_path / f"g8{suffix}"))
    pixels16 = read_image(_save(sixteen, tmp_path / f"g16{suffix}"))
    _check(pixels8, (6, 8))
    _check(pixels16, (6, 8))
    np.testing.assert_array_equal(pixels8, eight / np.float32(255))
    np.testing.assert_allclose(pixels16, sixteen / 65535.0, atol=1e-7)
    assert pixels16[0, 0] == 0.0 and pixels16[-1, -1] == 1.0
    np.testing.assert_allclose(pixels8, pixels16, atol=1 / 255)  # same scale at either depth


def test_rgb(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    pixels = read_image(_save(rgb, tmp_path / "rgb.png"))
    _check(pixels, (5, 7, 3))
    np.testing.assert_array_equal(pixels, rgb / np.float32(255))


def test_rgba_and_la_are_composited_over_black(tmp_path: Path) -> None:
    rgba = np.full((2, 3, 4), 200, dtype=np.uint8)
    rgba[..., 3] = [[0, 255, 51], [255, 0, 102]]
    pixels = read_image(_save(rgba, tmp_path / "rgba.png"))
    _check(pixels, (2, 3, 3))
    np.testing.assert_allclose(pixels[..., 0], [[0, 200 / 255, 40 / 255], [200 / 255, 0, 80 / 255]])
    la = read_image(_save(rgba, tmp_path / "la.png", mode="LA"))
    _check(la, (2, 3))
    np.testing.assert_allclose(la, pixels[..., 0], atol=1e-6)


def test_grey_palette_stays_one_channel(tmp_path: Path) -> None:
    grey = _ramp(np.uint8, 255)
    pixels = read_image(_save(grey, tmp_path / "p.png", mode="P"))
    _check(pixels, (6, 8))
    np.testing.assert_array_equal(pixels, grey / np.float32(255))


def test_colour_palette_becomes_rgb(tmp_path: Path) -> None:
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    image.save(tmp_path / "p.png")
    pixels = read_image(tmp_path / "p.png")
    _check(pixels, (2, 4, 3))
    np.testing.assert_array_equal(pixels[0, 0], [1, 0, 0])
    np.testing.assert_array_equal(pixels[0, 1], [0, 0, 1])


def test_palette_transparency_is_composited(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.putdata([0, 1])
    image.save(tmp_path / "t.png", transparency=0)
    pixels = read_image(tmp_path / "t.png")
    np.testing.assert_array_equal(pixels, [[[0, 0, 0], [0, 1, 0]]])


def test_bilevel(tmp_path: Path) -> None:
    bits = np.array([[0, 255, 0], [255, 255, 0]], dtype=np.uint8)
    pixels = read_image(_save(bits, tmp_path / "b.png", mode="1"))
    _check(pixels, (2, 3))
    np.testing.assert_array_equal(pixels, bits / 255)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path) -> None:
    rgb = np.full((8, 8, 3), (10, 120, 240), dtype=np.uint8)
    pixels = read_image(_save(rgb, tmp_path / "c.jpg", mode="CMYK", quality=100))
    _check(pixels, (8, 8, 3))
    np.testing.assert_allclose(pixels[4, 4], np.array([10, 120, 240]) / 255, atol=0.03)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.fromarray(_ramp(np.uint8, 255, (4, 10)))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    image.save(tmp_path / "o.jpg", exif=exif)
    assert read_image(tmp_path / "o.jpg").shape == (10, 4)


def test_float_tiff(tmp_path: Path) -> None:
    unit = RNG.random((4, 5), dtype=np.float32)
    np.testing.assert_array_equal(read_image(_save(unit, tmp_path / "u.tif")), unit)
    wide = unit * 3000 - 1000
    stretched = read_image(_save(wide, tmp_path / "w.tif"))
    _check(stretched, (4, 5))
    np.testing.assert_allclose(stretched, (wide - wide.min()) / np.ptp(wide), atol=1e-6)


def test_32_bit_integer_tiff(tmp_path: Path) -> None:
    values = _ramp(np.int32, 65535)
    pixels = read_image(_save(values, tmp_path / "i.tif"))
    assert Image.open(tmp_path / "i.tif").mode == "I"
    np.testing.assert_allclose(pixels, values / 65535.0, atol=1e-7)


def test_unreadable_files(tmp_path: Path) -> None:
    png = _save(RNG.integers(0, 256, (64, 64), dtype=np.uint8), tmp_path / "full.png")
    (tmp_path / "cut.png").write_bytes(png.read_bytes()[:200])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image\n")
    cases = {
        "cut.png": "corrupt image",
        "empty.png": "empty file",
        "notes.png": "not a DICOM file or an image Pillow reads",
        "missing.png": "cannot open file",
    }
    for name, reason in cases.items():
        with pytest.raises(ImageReadError, match=reason) as caught:
            read_image(tmp_path / name)
        assert "\n" not in str(caught.value)
        with pytest.raises(ImageReadError, match=reason):
            load_image(tmp_path / name)


def test_load_image_dispatches_by_content(tmp_path: Path) -> None:
    dicom_as_png = tmp_path / "scan.png"
    shutil.copyfile(get_testdata_file("CT_small.dcm"), dicom_as_png)
    png_as_dicom = tmp_path / "xray.dcm"
    shutil.copyfile(PNGS[0], png_as_dicom)

    loaded = load_image(dicom_as_png)
    assert isinstance(loaded, LoadedImage)
    assert loaded.sop_instance_uid == loaded.meta["SOPInstanceUID"] != ""
    _check(loaded.pixels, (128, 128))

    png = load_image(png_as_dicom)
    assert (png.sop_instance_uid, png.meta) == ("", {})
    np.testing.assert_array_equal(png.pixels, read_image(PNGS[0]))


def test_load_image_passes_window_and_frames() -> None:
    path = DATA / "dicom" / "corpus" / "emri_small.dcm"
    loaded = load_image(path, window="percentile", frames="middle")
    reference = read_dicom(path, window="percentile", frames="middle")
    np.testing.assert_array_equal(loaded.pixels, reference.pixels)
    assert loaded.meta["frame_index"] == 5 and loaded.meta["window_source"] == "percentile"
