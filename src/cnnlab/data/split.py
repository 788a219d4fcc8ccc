"""The `split` stage: verify every image once, quarantine the bad ones, split by class and seed.

Output folder (``data/split``)::

    images/<split>/<class>/<name>.png   verified, EXIF-upright, 8-bit L or RGB copies
    train.csv  val.csv  test.csv        manifests: path (relative to the folder), label, class, source
    classes.json                        class names; a label is an index into this list
    quarantine.csv                      file, reason: every image that could not be used

Paths in the CSVs use '/' on every OS, so the outputs (and the keys later stages match on) are
the same wherever the stage ran. Later stages read only these normalized PNGs, so no untrusted
file is decoded twice.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.config import SplitParams
from cnnlab.data.folders import scan_image_folder
from cnnlab.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from cnnlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    convert_mode,
    downscale,
    load_image,
)
from cnnlab.data.sources import read_source_info
from cnnlab.utils.files import staged_dir, write_csv, write_json
from cnnlab.utils.progress import progress

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("path", "label", "class", "source")


class SplitError(ValueError):
    """The data cannot be split as configured; the message names the class and the numbers."""


def stratified_split(
    labels: np.ndarray,
    official: Sequence[str | None],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    caps: dict[str, int | None],
    class_names: Sequence[str],
) -> dict[str, np.ndarray]:
    """Indices per split, drawn class by class so every split keeps the class balance.

    An official split in the source wins: when any item is marked "test" (or "val"), that split
    comes only from marked items and the fraction is not carved from the rest. Caps take the
    first N of a seeded shuffle, so a smaller cap gives a subset of a larger one's picks.
    """
    official_arr = np.array([o or "" for o in official])
    has_official = {s: bool((official_arr == s).any()) for s in ("val", "test")}
    rng = np.random.default_rng(seed)
    picks: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label, name in enumerate(class_names):
        mine = labels == label
        pool = rng.permutation(np.flatnonzero(mine & ~np.isin(official_arr, ["val", "test"])))
        chosen: dict[str, np.ndarray] = {}
        n_pool = len(pool)
        for split, fraction in (("test", test_fraction), ("val", val_fraction)):
            if has_official[split]:
                chosen[split] = rng.permutation(np.flatnonzero(mine & (official_arr == split)))
            else:
                n = max(1, round(fraction * n_pool)) if n_pool >= 3 else 0
                chosen[split], pool = pool[:n], pool[n:]
        chosen["train"] = pool
        for split in SPLITS:
            cap = caps.get(split)
            got = chosen[split][:cap] if cap is not None else chosen[split]
            if len(got) == 0:
                raise SplitError(
                    f"class {name!r} has no usable image for the {split} split "
                    f"({int(mine.sum())} usable in all); add images to it or remove the class"
                )
            picks[split].append(got)
    return {s: np.sort(np.concatenate(picks[s])) for s in SPLITS}


@dataclass
class _Dataset:
    classes: list[str]
    labels: np.ndarray
    official: list[str | None]
    names: list[str]  # output file stem, unique within a class
    sources: list[str]  # where each item came from, for the manifest
    load: Callable[[int], Image.Image]
    grey: bool  # every usable image is single-channel
    quarantine: list[tuple[str, str]]
    skipped: int


def _from_idx(raw_dir: Path) -> _Dataset:
    data = load_fashion_mnist(raw_dir / "idx")
    images = np.concatenate([data["train"][0], data["test"][0]])
    labels = np.concatenate([data["train"][1], data["test"][1]]).astype(np.int64)
    n_train = len(data["train"][1])
    official = [None] * n_train + ["test"] * (len(labels) - n_train)
    names = [f"train-{i:05d}" for i in range(n_train)] + [f"t10k-{i:05d}" for i in range(len(labels) - n_train)]
    return _Dataset(
        classes=list(FASHION_MNIST_CLASSES), labels=labels, official=official, names=names,
        sources=[f"idx/{'train' if n.startswith('train') else 't10k'}-images-idx3-ubyte.gz#{int(n[-5:])}" for n in names],
        load=lambda i: Image.fromarray(images[i], mode="L"), grey=True, quarantine=[], skipped=0,
    )


def _from_folder(raw_dir: Path, *, max_pixels: int) -> _Dataset:
    root = raw_dir / "images"
    classes, items, skipped = scan_image_folder(root, IMAGE_EXTENSIONS)

    def check(path: Path) -> str:
        try:
            return load_image(path, max_pixels=max_pixels).mode
        except ImageDecodeError as exc:
            return f"!{exc.reason}"

    # Sequential on purpose: load_image scopes a warnings filter, and warning filters are
    # process-global state that threads would race on.
    modes = [check(it.path) for it in progress(items, desc="verify images")]
    good = [(it, m) for it, m in zip(items, modes, strict=True) if not m.startswith("!")]
    quarantine = [(it.path.relative_to(raw_dir).as_posix(), m[1:])
                  for it, m in zip(items, modes, strict=True) if m.startswith("!")]
    index = {c: i for i, c in enumerate(classes)}
    paths = [it.path for it, _ in good]
    return _Dataset(
        classes=classes,
        labels=np.array([index[it.cls] for it, _ in good], dtype=np.int64),
        official=[it.official_split for it, _ in good],
        # Two official splits may hold files of the same name, so the split goes into the name.
        names=[f"{it.official_split}-{it.stem}" if it.official_split else it.stem for it, _ in good],
        sources=[p.relative_to(raw_dir).as_posix() for p in paths],
        load=lambda i: load_image(paths[i], max_pixels=max_pixels),
        grey=all(m == "L" for _, m in good),
        quarantine=quarantine,
        skipped=skipped,
    )


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def run_split(raw_dir: Path, out_dir: Path, cfg: SplitParams, *, seed: int) -> dict:
    """Verify, split and write ``out_dir`` (see the module docstring); returns counts for metrics."""
    info = read_source_info(raw_dir)
    if info["format"] == "idx":
        ds = _from_idx(raw_dir)
    else:
        ds = _from_folder(raw_dir, max_pixels=cfg.max_image_pixels)
    mode = {"grey": "L", "rgb": "RGB"}.get(cfg.color_mode, "L" if ds.grey else "RGB")
    picks = stratified_split(
        ds.labels, ds.official, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        caps={"train": cfg.max_train_per_class, "val": cfg.max_val_per_class, "test": cfg.max_test_per_class},
        class_names=ds.classes,
    )

    def render(i: int) -> bytes:
        return _png_bytes(downscale(convert_mode(ds.load(i), mode), cfg.max_side))

    with staged_dir(out_dir) as tmp:
        for split in SPLITS:
            for cls in ds.classes:
                (tmp / "images" / split / cls).mkdir(parents=True)
        rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
        for split in SPLITS:
            for i in progress(picks[split], desc=f"write {split}"):
                cls = ds.classes[ds.labels[i]]
                rel = f"images/{split}/{cls}/{ds.names[i]}.png"
                (tmp / rel).write_bytes(render(i))
                rows[split].append({"path": rel, "label": int(ds.labels[i]), "class": cls,
                                    "source": ds.sources[i]})
            write_csv(tmp / f"{split}.csv", MANIFEST_FIELDS, rows[split])
        write_json(tmp / "classes.json", ds.classes)
        # Serving repeats these steps on raw uploads, so a served image gets the pixels this split gave.
        write_json(tmp / "preprocess.json", {"color_mode": mode, "max_side": cfg.max_side,
                                             "max_image_pixels": cfg.max_image_pixels})
        write_csv(tmp / "quarantine.csv", ("file", "reason"),
                  ({"file": f, "reason": r} for f, r in sorted(ds.quarantine)))
        summary = {
            "classes": len(ds.classes),
            "color_mode": mode,
            **{f"{s}_images": len(picks[s]) for s in SPLITS},
            "quarantined": len(ds.quarantine),
            "skipped_non_images": ds.skipped,
        }
    return summary


def read_manifest(split_dir: Path, split: str) -> list[dict]:
    """Rows of ``<split>.csv`` with ``label`` as int and ``path`` made absolute."""
    with open(split_dir / f"{split}.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        row["label"] = int(row["label"])
        row["path"] = str(split_dir / row["path"])
    return rows
