"""Decode untrusted image files once, safely, into plain "L" or "RGB" images.

`load_image` is the single gate between user files and the rest of the pipeline: every way a
file can be unusable becomes an `ImageDecodeError` whose `reason` goes into the quarantine report.
"""

from __future__ import annotations

import io
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)

# Content is sniffed regardless of the file name, so restrict Pillow to the formats behind
# IMAGE_EXTENSIONS: otherwise e.g. an EPS file renamed to .jpg would be handed to Ghostscript.
# (Multi-picture camera JPEGs still open: Pillow's JPEG opener hands them to its MPO class.)
_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
_PILLOW_ERRORS = (OSError, SyntaxError, ValueError, struct.error, EOFError)


class ImageDecodeError(ValueError):
    """An unusable image file; `reason` is a short human phrase for the quarantine report."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def load_image(path: Path, *, max_pixels: int) -> Image.Image:
    """Decode an untrusted image file fully; mode "L" for single-channel sources, else "RGB".

    Only the first frame of animated files is used and EXIF orientation is applied. The size
    limit is checked from the header, before any pixel data is decoded. I/O errors opening the
    file (missing, permission denied) are not image problems and propagate unchanged.
    """
    path = Path(path)
    with open(path, "rb") as fp:
        return _decode(fp, path, max_pixels)


def load_image_bytes(data: bytes, *, max_pixels: int, name: str = "<request>") -> Image.Image:
    """`load_image` for encoded bytes held in memory (an upload, an HTTP request body)."""
    return _decode(io.BytesIO(data), Path(name), max_pixels)


def decode_stored(data: bytes) -> Image.Image:
    """Decode an image the split or augment stage stored (`cnnlab.data.shards`): the same steps as
    `load_image`, which verified it, without its size check and warnings filter. Those are
    process-global state, and this runs in threads (Pillow lets go of the GIL while decoding)."""
    with Image.open(io.BytesIO(data), formats=_FORMATS) as im:
        im.load()
        return _normalize(ImageOps.exif_transpose(im))


def _decode(fp: BinaryIO, path: Path, max_pixels: int) -> Image.Image:
    if fp.seek(0, 2) == 0:
        raise ImageDecodeError(path, "empty file")
    fp.seek(0)
    decoding = False
    try:
        # catch_warnings restores the filters on exit; Pillow's own limit stays a backstop.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp, formats=_FORMATS) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageDecodeError(
                        path,
                        f"too large: {width}x{height} = {width * height} pixels"
                        f" > limit {max_pixels}",
                    )
                decoding = True
                im.load()  # decode every pixel now so truncation surfaces here
                decoding = False
                # exif_transpose always returns a new image, so the result is detached from fp.
                upright = ImageOps.exif_transpose(im)
                out = _normalize(upright)
                # What the file was, for the data report (the pixels are all the rest needs).
                out.info = {"source_format": im.format, "source_mode": im.mode,
                            "rotated": upright.size != im.size or im.getexif().get(0x0112, 1) not in (0, 1)}
                return out
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(path, f"too large: {_short(e)}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not an image (unrecognized format)") from None
    except _PILLOW_ERRORS as e:
        prefix = "truncated or corrupt" if decoding else "corrupt"
        raise ImageDecodeError(path, f"{prefix}: {_short(e)}") from None


def _short(e: BaseException) -> str:
    # Pillow messages can be long ("..., could be decompression bomb DOS attack."); keep clause one.
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    return first.split(", could be")[0][:120]


def _normalize(im: Image.Image) -> Image.Image:
    """Map any decoded mode to "L" or "RGB" without Pillow's lossy shortcuts."""
    if im.mode == "P":
        im = im.convert("RGBA" if im.has_transparency_data else "RGB")
    elif im.mode in ("PA", "RGBa", "La"):
        im = im.convert("RGBA" if im.mode != "La" else "LA")
    if im.mode in ("L", "RGB"):
        return im
    if im.mode == "1":
        return im.convert("L")
    if im.mode in ("LA", "RGBA"):
        # Plain convert() drops alpha, so a transparent pixel would show its (often black) colour.
        base = "L" if im.mode == "LA" else "RGB"
        out = Image.new(base, im.size, 255 if base == "L" else (255, 255, 255))
        out.paste(im.convert(base), mask=im.getchannel("A"))
        return out
    if im.mode == "I" or im.mode.startswith("I;16"):
        # convert("L") clips 16-bit values at 255 (nearly everything turns white); rescale instead.
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((values + 128) // 257).astype(np.uint8))
    if im.mode == "F":
        values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.max() <= 1.0:
            values = values * 255.0
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
    return im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX: Pillow's conversions are right here


def convert_mode(image: Image.Image, mode: Literal["L", "RGB"]) -> Image.Image:
    """Convert between "L" and "RGB" (ITU-R 601 luma for RGB -> L); `image` itself when equal.

    Other source modes are refused: they must go through `load_image`'s normalization first.
    """
    if mode not in ("L", "RGB") or image.mode not in ("L", "RGB"):
        raise ValueError(f"convert_mode handles only L <-> RGB, got {image.mode} -> {mode}")
    return image if image.mode == mode else image.convert(mode)


def downscale(image: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink so the longer side is at most `max_side`, keeping aspect; never enlarges.

    Returns `image` itself when it already fits or `max_side` is None.
    """
    if max_side is None:
        return image
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1 or None, got {max_side}")
    width, height = image.size
    longest = max(width, height)
    if longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    # reducing_gap lets Pillow box-reduce first: much faster on big photos, visually the same.
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
