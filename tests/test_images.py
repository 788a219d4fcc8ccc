"""load_image / convert_mode / downscale on real files written with Pillow at test time."""

from __future__ import annotations

import os
import resource
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from cnnlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    convert_mode,
    downscale,
    load_image,
)

LIMIT = 40_000_000


def _load(path: Path, max_pixels: int = LIMIT) -> Image.Image:
    return load_image(path, max_pixels=max_pixels)


def _reason(path: Path, max_pixels: int = LIMIT) -> str:
    with pytest.raises(ImageDecodeError) as info:
        _load(path, max_pixels)
    return info.value.reason


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tol: int) -> bool:
    return all(abs(a - e) <= tol for a, e in zip(actual, expected, strict=True))


def _pixels(img: Image.Image) -> list[object]:
    return [img.getpixel((x, y)) for y in range(img.height) for x in range(img.width)]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_png(path: Path, width: int, height: int, idat: bytes) -> Path:
    """A 1-bit greyscale PNG with the given (possibly bogus) compressed pixel stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    return path


def _real_bomb_idat(width: int, height: int) -> bytes:
    # Stream row by row: the raw image (~112 MB for 30000x30000) never exists in memory.
    comp = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    return b"".join(comp.compress(row) for _ in range(height)) + comp.flush()


# --- successful decodes -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".webp", ".tiff"])
def test_rgb_round_trip_keeps_mode_size_and_colour(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    Image.new("RGB", (37, 23), (200, 40, 90)).save(path)
    img = _load(path)
    assert (img.mode, img.size) == ("RGB", (37, 23))
    assert _close(img.getpixel((5, 5)), (200, 40, 90), tol=6)


def test_grey_png_stays_single_channel(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.new("L", (10, 8), 77).save(path)
    img = _load(path)
    assert (img.mode, img.size, img.getpixel((3, 3))) == ("L", (10, 8), 77)


def test_bilevel_png_becomes_black_and_white_l(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    bits = Image.new("1", (4, 1), 0)
    bits.putpixel((2, 0), 1)
    bits.save(path)
    img = _load(path)
    assert img.mode == "L"
    assert _pixels(img) == [0, 0, 255, 0]


def test_cmyk_jpeg_converts_to_right_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(path)  # pure cyan ink
    img = _load(path)
    assert img.mode == "RGB"
    assert _close(img.getpixel((8, 8)), (0, 255, 255), tol=10)


@pytest.mark.parametrize(
    ("suffix", "dtype", "expected_source_mode"),
    [(".png", np.uint16, "I;16"), (".tif", ">u2", "I;16B"), (".tif", np.int32, "I")],
)
def test_16_bit_values_are_rescaled_not_clipped(
    tmp_path: Path, suffix: str, dtype: object, expected_source_mode: str
) -> None:
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(np.array([[0, 256, 32768, 65535]], dtype=dtype)).save(path)
    with Image.open(path) as raw:
        assert raw.mode == expected_source_mode  # the branch we mean to exercise
    img = _load(path)
    assert img.mode == "L"
    low, one, mid, top = _pixels(img)
    assert (low, one, top) == (0, 1, 255)
    assert abs(mid - 128) <= 1


@pytest.mark.parametrize(
    ("values", "expected"), [([0.0, 0.5, 1.0], [0, 128, 255]), ([0.0, 100.0, 300.0], [0, 100, 255])]
)
def test_float_images_scale_unit_range_and_clip_larger(
    tmp_path: Path, values: list[float], expected: list[int]
) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([values], dtype=np.float32)).save(path)
    img = _load(path)
    assert img.mode == "L"
    assert _pixels(img) == expected


def test_rgba_alpha_is_composited_onto_white(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    src = Image.new("RGBA", (3, 1))
    src.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    src.save(path)
    img = _load(path)
    assert img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # transparent black -> white, not black
    assert img.getpixel((1, 0)) == (255, 0, 0)
    assert _close(img.getpixel((2, 0)), (127, 127, 127), tol=1)


def test_grey_alpha_is_composited_onto_white_and_stays_l(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    src = Image.new("LA", (2, 1))
    src.putdata([(0, 0), (0, 255)])
    src.save(path)
    img = _load(path)
    assert (img.mode, _pixels(img)) == ("L", [255, 0])


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    src = Image.new("P", (2, 1))
    src.putpalette([0, 0, 0, 255, 0, 0])
    src.putdata([0, 1])
    src.save(path, transparency=0)
    img = _load(path)
    assert img.mode == "RGB"
    assert _pixels(img) == [(255, 255, 255), (255, 0, 0)]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    path = tmp_path / "sideways.jpg"
    src = Image.new("RGB", (40, 20), (255, 255, 255))
    src.paste((255, 0, 0), (0, 0, 8, 8))  # mark the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    src.save(path, exif=exif, quality=95)
    img = _load(path)
    assert img.size == (20, 40)
    assert _close(img.getpixel((16, 3)), (255, 0, 0), tol=40)  # now top-right
    assert _close(img.getpixel((3, 3)), (255, 255, 255), tol=40)


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_image_uses_first_frame(tmp_path: Path, suffix: str) -> None:
    if suffix == ".webp" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    path = tmp_path / f"anim{suffix}"
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    red, green, blue = (Image.new("RGB", (8, 8), c) for c in colours)
    red.save(path, save_all=True, append_images=[green, blue], duration=50, loop=0, lossless=True)
    with Image.open(path) as raw:
        assert raw.n_frames == 3
    img = _load(path)
    assert (img.mode, img.size) == ("RGB", (8, 8))
    assert _close(img.getpixel((4, 4)), (255, 0, 0), tol=4)


def test_result_is_detached_and_file_closed(tmp_path: Path) -> None:
    path = tmp_path / "img.png"
    Image.new("RGB", (6, 6), (1, 2, 3)).save(path)
    fds_before = len(os.listdir("/proc/self/fd"))
    img = _load(path)
    assert len(os.listdir("/proc/self/fd")) == fds_before
    path.unlink()
    assert type(img) is Image.Image  # a plain copy, not a lazily-reading PngImageFile
    assert img.getpixel((0, 0)) == (1, 2, 3)


# --- rejections ---------------------------------------------------------------------------


def test_error_message_names_path_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as info:
        _load(path)
    assert (info.value.reason, str(info.value)) == ("empty file", f"{path}: empty file")
    assert isinstance(info.value, ValueError)


def test_text_file_named_jpg_is_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not a JPEG\n")
    assert _reason(path) == "not an image (unrecognized format)"


def test_formats_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "sneaky.png"
    Image.new("RGB", (4, 4)).save(path, format="PPM")  # Pillow reads PPM, but we must not
    assert _reason(path) == "not an image (unrecognized format)"


def test_truncated_jpeg_is_detected_at_load(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path).startswith("truncated or corrupt")


def test_recognized_but_unsupported_file_is_corrupt_without_traceback(tmp_path: Path) -> None:
    path = tmp_path / "odd.bmp"
    Image.new("RGB", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    data[30:34] = struct.pack("<I", 99)  # BITMAPINFOHEADER compression: no such method
    path.write_bytes(bytes(data))
    assert _reason(path) == "corrupt: Unsupported BMP compression (99)"


def test_over_limit_image_is_rejected_and_limit_is_inclusive(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(path)
    assert _reason(path, max_pixels=10_000) == "too large: 200x200 = 40000 pixels > limit 10000"
    assert _load(path, max_pixels=40_000).size == (200, 200)


def test_size_is_checked_before_pixel_data_is_decoded(tmp_path: Path) -> None:
    # Undecodable pixel data: if it were decoded before the size check we would see "corrupt".
    path = _write_png(tmp_path / "header.png", 5000, 5000, b"garbage")
    assert _reason(path, max_pixels=1_000_000).startswith("too large: 5000x5000")
    assert _reason(path, max_pixels=10**8).startswith("truncated or corrupt")


def test_pillow_bomb_warning_becomes_our_error(tmp_path: Path) -> None:
    # 100M pixels: above Pillow's warning threshold, below its hard limit and below ours.
    path = _write_png(tmp_path / "warn.png", 10_000, 10_000, b"garbage")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")  # a mere warning must not be enough to stop the load
        reason = _reason(path, max_pixels=2 * 10**8)
    assert reason.startswith("too large: Image size (100000000 pixels) exceeds limit")
    assert escaped == []


def test_real_decompression_bomb_is_refused_cheaply(tmp_path: Path) -> None:
    path = _write_png(tmp_path / "bomb.png", 30_000, 30_000, _real_bomb_idat(30_000, 30_000))
    assert path.stat().st_size < 1_000_000
    def pillow_state() -> tuple[object, ...]:
        return (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES, list(warnings.filters))

    saved = pillow_state()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    assert _reason(path).startswith("too large")
    assert _reason(path, max_pixels=10**10).startswith("too large")  # Pillow's guard still holds
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 100  # decoding would need ~900 MiB
    assert pillow_state() == saved


# --- helpers ------------------------------------------------------------------------------


def test_convert_mode_round_trips() -> None:
    grey = Image.new("L", (3, 2), 90)
    rgb = convert_mode(grey, "RGB")
    assert (rgb.mode, rgb.getpixel((0, 0))) == ("RGB", (90, 90, 90))
    back = convert_mode(rgb, "L")
    assert (back.mode, back.getpixel((0, 0))) == ("L", 90)
    assert convert_mode(grey, "L") is grey
    assert convert_mode(rgb, "RGB") is rgb


def test_convert_mode_refuses_other_modes() -> None:
    with pytest.raises(ValueError, match="RGBA"):
        convert_mode(Image.new("RGBA", (1, 1)), "RGB")
    with pytest.raises(ValueError, match="CMYK"):
        convert_mode(Image.new("RGB", (1, 1)), "CMYK")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [((1000, 500), 100, (100, 50)), ((500, 1000), 100, (50, 100)), ((50, 20), 100, (50, 20)),
     ((100, 100), 100, (100, 100)), ((1000, 3), 100, (100, 1)), ((1000, 500), None, (1000, 500))],
)
def test_downscale_only_shrinks_and_keeps_aspect(
    size: tuple[int, int], max_side: int | None, expected: tuple[int, int]
) -> None:
    img = Image.new("RGB", size, (10, 20, 30))
    out = downscale(img, max_side)
    assert out.size == expected
    if expected == size:
        assert out is img
    else:
        assert _close(out.getpixel((0, 0)), (10, 20, 30), tol=1)


def test_downscale_rejects_nonpositive_side() -> None:
    with pytest.raises(ValueError):
        downscale(Image.new("L", (4, 4)), 0)


def test_image_extensions_are_lower_case_suffixes() -> None:
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
