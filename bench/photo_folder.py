"""Photo-like ImageFolder trees for tests and benchmarks.

Real user folders are not MNIST: sizes vary, some files are PNG with alpha,
CMYK or greyscale JPEGs, phone photos carry an EXIF rotation, and junk files
(truncated, empty, ``.DS_Store``, notes) sit next to the images.  This module
makes such trees from numpy + Pillow only, byte-for-byte deterministic per seed
(explicit JPEG quality, no timestamps, one RNG per image), so tests can pin
hashes and benchmarks can regenerate the same data anywhere.

Each class is a distinct shape/pattern on a noisy gradient background with a
random position, scale and colour: a small CNN learns it well at 64 px and
worse at 28 px (thin stripes blur away), so accuracy still means something.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

Mask = Callable[[np.ndarray, np.ndarray], np.ndarray]
_F = np.floor
SHAPES: dict[str, Mask] = {  # u, v in [0, 1) over the shape's square box
    "circle": lambda u, v: (u - 0.5) ** 2 + (v - 0.5) ** 2 < 0.25,
    "square": lambda u, v: np.maximum(abs(u - 0.5), abs(v - 0.5)) < 0.4,
    "triangle": lambda u, v: (v > 0.1) & (v < 0.9) & (abs(u - 0.5) < (v - 0.1) * 0.55),
    "hstripes": lambda u, v: _F(v * 7) % 2 == 0,
    "vstripes": lambda u, v: _F(u * 7) % 2 == 0,
    "cross": lambda u, v: (abs(u - 0.5) < 0.12) | (abs(v - 0.5) < 0.12),
    "ring": lambda u, v: abs(np.hypot(u - 0.5, v - 0.5) - 0.4) < 0.1,
    "dstripes": lambda u, v: _F((u + v) * 5) % 2 == 0,
    "checker": lambda u, v: (_F(u * 6) + _F(v * 6)) % 2 == 0,
    "twodots": lambda u, v: (np.hypot(u - 0.25, v - 0.25) < 0.2) | (np.hypot(u - 0.75, v - 0.75) < 0.2),
}
SHAPE_NAMES = list(SHAPES)
# Kind per image index i % 8: most files are plain JPEGs, as in a real folder.
KINDS = ["jpeg", "png_alpha", "cmyk", "exif_rotated", "jpeg", "jpeg", "grey", "jpeg"]
DS_STORE = b"\x00\x00\x00\x01Bud1" + bytes(range(64)) * 4


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v)) * 255.0


def draw(cls_idx: int, n_classes: int, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Draw one RGB image of class ``cls_idx``: shape ``cls_idx % 10``.

    With more than 10 classes, shapes repeat, so each repeat ("cycle") gets its
    own hue band for the shape colour; otherwise the hue is fully random, so
    colour alone never tells classes apart.
    """
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    # Background: gradient between two desaturated colours + blotches + grain.
    c1, c2 = (_hsv(rng.random(), rng.uniform(0, 0.35), rng.uniform(0.25, 0.85)) for _ in range(2))
    th = rng.uniform(0, 2 * math.pi)
    t = xx * math.cos(th) + yy * math.sin(th)
    t = (t - t.min()) / max(np.ptp(t), 1e-9)
    bg = c1 * (1 - t[..., None]) + c2 * t[..., None]
    blot = rng.normal(0, 18, (h // 16 + 2, w // 16 + 2, 3)).clip(-60, 60) + 128
    bg += np.asarray(Image.fromarray(blot.astype(np.uint8)).resize((w, h), Image.BILINEAR), float) - 128
    # Shape: square box of 25-60% of the short side, anywhere inside the image.
    s = rng.uniform(0.25, 0.60) * min(w, h)
    x0, y0 = rng.uniform(0, w - s), rng.uniform(0, h - s)
    u, v = (xx - x0) / s, (yy - y0) / s
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    mask = inside & SHAPES[SHAPE_NAMES[cls_idx % len(SHAPES)]](u, v)
    cycles = math.ceil(n_classes / len(SHAPES))
    hue = rng.random() if cycles == 1 else (cls_idx // len(SHAPES)) / cycles + rng.uniform(-0.3, 0.3) / cycles
    fg = _hsv(hue, rng.uniform(0.6, 1), rng.uniform(0.5, 1)) + rng.normal(0, 6, (h, w, 3))
    img = np.where(mask[..., None], fg, bg) + rng.normal(0, 8, (h, w, 3))
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def encode(im: Image.Image, kind: str, quality: int = 90) -> bytes:
    """Encode ``im`` as one of the file kinds real folders contain."""
    buf = io.BytesIO()
    if kind == "jpeg":
        im.save(buf, "JPEG", quality=quality)
    elif kind == "png_alpha":  # alpha 200 except a fully transparent corner
        alpha = np.full((im.height, im.width), 200, np.uint8)
        alpha[: im.height // 4, : im.width // 4] = 0
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.fromarray(alpha, "L"))
        rgba.save(buf, "PNG")
    elif kind == "cmyk":
        im.convert("CMYK").save(buf, "JPEG", quality=quality)
    elif kind == "exif_rotated":  # stored sideways; exif_transpose makes it upright
        exif = Image.Exif()
        exif[0x0112] = 6
        im.rotate(90, expand=True).save(buf, "JPEG", quality=quality, exif=exif.tobytes())
    elif kind == "grey":
        im.convert("L").save(buf, "JPEG", quality=quality)
    else:
        raise ValueError(f"unknown kind {kind!r}")
    return buf.getvalue()


def _image(cls_idx: int, n: int, seed: int, i: int, sizes: tuple[int, int]) -> Image.Image:
    """One RNG per (seed, class, index): files don't depend on generation order."""
    rng = np.random.default_rng([seed, cls_idx, i])
    w, h = (int(x) for x in rng.integers(sizes[0], sizes[1] + 1, 2))
    return draw(cls_idx, n, rng, (w, h))


def make_photo_folder(
    root: Path, counts: dict[str, int], *, seed: int = 0, sizes: tuple[int, int] = (220, 480), extras: bool = True
) -> dict:
    """Write ``root/<class>/<file>`` for ``counts`` and describe what was written.

    Classes are indexed in sorted-name order (that is what ImageFolder does), so
    the shape of a class depends only on its rank, not on dict order.
    """
    root = Path(root)
    classes = sorted(counts)
    out: dict[str, Any] = {"classes": classes, "images": {}, "broken": [], "stray": [], "bytes": 0}

    def put(rel: str, data: bytes) -> None:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        out["bytes"] += len(data)

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(counts[c]):
            im, kind = _image(k, len(classes), seed, i, sizes), KINDS[i % 8]
            rel = f"{c}/img_{i:04d}.{'png' if kind == 'png_alpha' else 'jpg'}"
            put(rel, encode(im, kind))
            out["images"][rel] = {"class": c, "kind": kind, "size": im.size}
    if extras:
        real = encode(_image(0, len(classes), seed, 10**6, sizes), "jpeg")
        junk = [
            ("broken.jpg", real[:300], "broken"),  # cut inside the headers, like an interrupted copy
            ("empty.jpg", b"", "broken"),
            ("notes.txt", b"shot on holiday, labels checked by hand\n", "stray"),
        ]
        for c, (name, data, key) in zip(classes, junk):
            put(f"{c}/{name}", data)
            out[key].append(f"{c}/{name}")
        put(".DS_Store", DS_STORE)
        out["stray"].append(".DS_Store")
    return out


def _relink(link: Path, target: str | Path) -> None:
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link, target_is_directory=Path(link.parent, target).is_dir())


def add_hazards(root: Path, *, outside: Path) -> dict:
    """Add what real user folders also hold: duplicates, a cross-class conflict,
    a near-duplicate, a symlink loop, links escaping the tree, odd file names,
    an empty class and a stray file.  Returns what was added, by hazard.

    ``outside`` gets the targets of the escaping links, so tests can check that
    none of those bytes ever lands in data/ or a DVC cache.
    """
    root, outside = Path(root), Path(outside).resolve()
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink())
    if len(classes) < 3:
        raise ValueError("add_hazards needs a folder with at least 3 classes")
    a, b, n = classes[0], classes[1], len(classes)
    plain = sorted(p for p in (root / a).glob("img_*.jpg") if KINDS[int(p.stem[4:]) % 8] == "jpeg")
    if not plain:
        raise ValueError(f"class {a} has no plain JPEG to copy")
    src = [plain[j % len(plain)] for j in range(3)]
    rel = lambda p: Path(p).relative_to(root).as_posix()
    out: dict[str, Any] = {}

    dup = root / a / f"copy_of_{src[0].name}"
    shutil.copyfile(src[0], dup)
    out["duplicate_in_class"] = [(rel(src[0]), rel(dup))]
    conf = root / b / f"from_{a}_{src[1].name}"
    shutil.copyfile(src[1], conf)
    out["conflict"] = (rel(src[1]), rel(conf))
    near = root / a / f"{src[2].stem}_q60.jpg"
    with Image.open(src[2]) as im:
        near.write_bytes(encode(im.convert("RGB"), "jpeg", quality=60))
    out["near_duplicate"] = (rel(src[2]), rel(near))

    _relink(root / a / "loop", "..")
    out["loop"] = f"{a}/loop"
    (outside / "more").mkdir(parents=True, exist_ok=True)
    # Fresh drawings (indices far past any class count), never copies of the tree's files.
    small = lambda i: encode(_image(0, n, 9001, 2 * 10**7 + i, (48, 96)), "jpeg")
    (outside / "secret.jpg").write_bytes(small(0))
    _relink(root / a / "secret.jpg", outside / "secret.jpg")
    out["outside_file"] = f"{a}/secret.jpg"
    for i in (1, 2):
        (outside / "more" / f"extra_{i}.jpg").write_bytes(small(i))
    _relink(root / b / "more", outside / "more")
    out["outside_dir"] = f"{b}/more"
    out["outside_bytes"] = [p.read_bytes() for p in sorted(outside.rglob("*")) if p.is_file()]

    out["odd_names"] = []
    for i, name in enumerate(["with space.jpg", "ünïcödé.jpg", "new\nline.jpg"]):
        (root / a / name).write_bytes(encode(_image(0, n, 4242, 10**7 + i, (220, 480)), "jpeg"))
        out["odd_names"].append(f"{a}/{name}")
    (root / "zz_empty_class").mkdir(exist_ok=True)
    out["empty_class"] = "zz_empty_class"
    (root / a / "readme.md").write_text("# my photos\nsorted by hand, some may be wrong\n")
    out["stray"] = f"{a}/readme.md"
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: imbalanced N-class folder (counts spread evenly from --min to --max)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    for flag, default in (("--classes", 10), ("--min", 80), ("--max", 400), ("--seed", 0)):
        ap.add_argument(flag, type=int, default=default)
    ap.add_argument("--hazards", action="store_true")
    args = ap.parse_args(argv)
    counts = {
        f"c{k:02d}_{SHAPE_NAMES[k % len(SHAPES)]}": round(c)
        for k, c in enumerate(np.linspace(args.min, args.max, args.classes).tolist())
    }
    info = make_photo_folder(args.out, counts, seed=args.seed)
    files = len(info["images"]) + len(info["broken"]) + len(info["stray"])
    print(
        f"{args.out}: {files} files, {info['bytes']} bytes, {len(counts)} classes: "
        + " ".join(f"{c}={n}" for c, n in counts.items())
    )
    if args.hazards:
        hz = add_hazards(args.out, outside=args.out.parent / (args.out.name + "_outside"))
        print(
            "hazards: "
            + ", ".join(k for k in hz if k != "outside_bytes")
            + f"; outside files: {len(hz['outside_bytes'])}"
        )


if __name__ == "__main__":
    main()
