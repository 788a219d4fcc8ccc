"""The `split` stage: verify every image once, quarantine the bad ones, split by class and seed.

Output folder (``data/split``)::

    <split>-<i>-of-<n>.parquet          the verified images (`cnnlab.data.shards`): a file's own
                                        bytes when it needs no change, else made upright, converted
                                        and downscaled, and re-encoded (JPEG from a JPEG, else PNG)
    train.csv  val.csv  test.csv        manifests: key, label, class, source, shard, row, format, stored
    shards.json                         each shard's rows, bytes and sha256
    classes.json                        class names; a label is an index into this list
    quarantine.csv                      file, reason: every image that could not be used
    report.json  report.md              the data report (`cnnlab.data.report`): counts, sizes,
                                        duplicates, conflicts, leakage, what auto resolves to

Keys and sources in the CSVs use '/' on every OS, so the outputs (and the keys later stages match
on) are the same wherever the stage ran. Later stages read only these shards, never the user's
files, and decode each image once per input size (`cnnlab.data.decoded`).
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.config import SplitParams
from cnnlab.data.duplicates import (
    drop_repeats,
    exact_groups,
    near_groups,
    pixel_digest,
    thumbnail,
)
from cnnlab.data.folders import scan_image_folder
from cnnlab.data.idx import FASHION_MNIST_CLASSES, load_fashion_mnist
from cnnlab.data.images import (
    IMAGE_EXTENSIONS,
    ImageDecodeError,
    convert_mode,
    downscale,
    load_image,
)
from cnnlab.data.report import (
    auto_image_size,
    imbalance,
    markdown,
    size_summary,
    test_resolution,
)
from cnnlab.data.shards import ShardWriter
from cnnlab.data.sources import read_source_info
from cnnlab.data.walk import merge_skipped
from cnnlab.utils.files import atomic_write_text, staged_dir, write_csv, write_json
from cnnlab.utils.progress import progress

_log = logging.getLogger(__name__)

# calibration: validation images kept from choosing anything (no epoch, no champion), on which
# evaluate fits each model's temperature and prediction-set threshold.
SPLITS = ("train", "val", "calibration", "test")
# Files in these formats are stored as they are when their decoded mode is the split's and they
# need no EXIF rotation or downscale: the same pixels, often a tenth of a PNG's bytes.
_KEEP_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}


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
    calibration_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
    """Indices per split, drawn class by class so every split keeps the class balance.

    An official split in the source wins: when any item is marked "test" (or "val"), that split
    comes only from marked items and the fraction is not carved from the rest. Caps take the
    first N of a seeded shuffle, so a smaller cap gives a subset of a larger one's picks. Then
    ``calibration_fraction`` of each class's (capped) validation images move to "calibration",
    leaving at least one in "val"; a class may have none there.
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
        val = chosen["val"][:caps["val"]] if caps.get("val") is not None else chosen["val"]
        keep = len(val) - min(max(len(val) - 1, 0), round(calibration_fraction * len(val)))
        chosen["val"], chosen["calibration"] = val[:keep], val[keep:]
        for split in SPLITS:
            cap = caps.get(split)
            got = chosen[split][:cap] if cap is not None else chosen[split]
            if len(got) == 0 and split != "calibration":
                raise SplitError(
                    f"class {name!r} has no usable image for the {split} split "
                    f"({int(mine.sum())} usable in all); add images to it or remove the class"
                )
            picks[split].append(got)
    return {s: np.sort(np.concatenate(picks[s])) for s in SPLITS}


@dataclass(frozen=True)
class Facts:
    """What verifying one image learned about it, for the report and the duplicate checks."""

    size: tuple[int, int]  # upright width, height
    mode: str  # "L" or "RGB", as decoded (`cnnlab.data.images.load_image`)
    kind: str  # the file's format and mode, e.g. "JPEG CMYK"
    rotated: bool  # turned upright from EXIF
    source: tuple[str, str]  # the file's format and mode as Pillow opened it, e.g. ("JPEG", "CMYK")
    digest: str  # of the decoded pixels (`cnnlab.data.duplicates.pixel_digest`)
    thumb: bytes | None  # for the near-duplicate search; None: made from the image when needed


def _facts(image: Image.Image, kind: str | None = None, *, thumb: bool = True) -> Facts:
    info = image.info
    source = (str(info.get("source_format")), str(info.get("source_mode")))
    return Facts(image.size, image.mode, kind or " ".join(source), bool(info.get("rotated")), source,
                 pixel_digest(image), thumbnail(image) if thumb else None)


@dataclass
class _Dataset:
    classes: list[str]
    labels: np.ndarray
    official: list[str | None]
    names: list[str]  # output file stem, unique within a class
    sources: list[str]  # where each item came from, for the manifest
    load: Callable[[int], Image.Image]
    read: Callable[[int], bytes] | None  # the file's own bytes (None: not from files)
    facts: list[Facts]
    quarantine: list[tuple[str, str]]
    skipped: dict[str, list[str]]

    def without(self, drop: set[int], reason: Callable[[int], str]) -> _Dataset:
        """The same data less the items in ``drop``, which join the quarantine with ``reason(i)``."""
        keep = np.array([i for i in range(len(self.labels)) if i not in drop], dtype=np.int64)
        load, read = self.load, self.read
        return _Dataset(
            classes=self.classes, labels=self.labels[keep], official=[self.official[i] for i in keep],
            names=[self.names[i] for i in keep], sources=[self.sources[i] for i in keep],
            load=lambda j: load(int(keep[j])), read=read and (lambda j: read(int(keep[j]))), facts=[self.facts[i] for i in keep],
            quarantine=self.quarantine + [(self.sources[i], reason(i)) for i in sorted(drop)], skipped=self.skipped,
        )


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
        load=lambda i: Image.fromarray(images[i], mode="L"), read=None,
        # Thumbnails only for the images the caps pick (`_report`): all 70,000 would cost ~1 s more.
        facts=[_facts(Image.fromarray(im, mode="L"), "IDX L", thumb=False)
               for im in progress(images, desc="hash images")],
        quarantine=[], skipped={},
    )


def _from_folder(root: Path, base: Path, *, max_pixels: int, follow_outside: bool = False,
                 skipped: dict[str, list[str]] | None = None) -> _Dataset:
    """The images under ``root``; paths in the manifests and the report are relative to ``base``."""
    classes, items, walk = scan_image_folder(root, IMAGE_EXTENSIONS, follow_outside=follow_outside)

    def check(path: Path) -> Facts | str:
        try:
            return _facts(load_image(path, max_pixels=max_pixels))
        except ImageDecodeError as exc:
            return exc.reason

    # Sequential on purpose: load_image scopes a warnings filter, and warning filters are
    # process-global state that threads would race on.
    facts = [check(it.path) for it in progress(items, desc="verify images")]
    good = [(it, f) for it, f in zip(items, facts, strict=True) if isinstance(f, Facts)]
    quarantine = [(it.path.relative_to(base).as_posix(), f)
                  for it, f in zip(items, facts, strict=True) if isinstance(f, str)]
    index = {c: i for i, c in enumerate(classes)}
    paths = [it.path for it, _ in good]
    return _Dataset(
        classes=classes,
        labels=np.array([index[it.cls] for it, _ in good], dtype=np.int64),
        official=[it.official_split for it, _ in good],
        # Two official splits may hold files of the same name, so the split goes into the name.
        names=[f"{it.official_split}-{it.stem}" if it.official_split else it.stem for it, _ in good],
        sources=[p.relative_to(base).as_posix() for p in paths],
        load=lambda i: load_image(paths[i], max_pixels=max_pixels), read=lambda i: paths[i].read_bytes(),
        facts=[f for _, f in good],
        quarantine=quarantine,
        skipped=merge_skipped(skipped, walk.skipped()),
    )


def _drop_conflicts(ds: _Dataset) -> tuple[_Dataset, list[list[str]]]:
    """Quarantine every copy of an image that appears under two classes: one label is wrong, and
    nothing here can tell which."""
    conflicts = [g for g in exact_groups([f.digest for f in ds.facts]) if len(set(ds.labels[g].tolist())) > 1]
    if not conflicts:
        return ds, []
    classes_of = {i: sorted({ds.classes[ds.labels[j]] for j in g}) for g in conflicts for i in g}
    files = [[ds.sources[i] for i in g] for g in conflicts]
    drop = {i for g in conflicts for i in g}
    return ds.without(drop, lambda i: "conflicting labels: the same image is under " + ", ".join(
        repr(c) for c in classes_of[i])), files


def _encoded(image: Image.Image, lossy: bool) -> tuple[bytes, str]:
    buf = io.BytesIO()
    if lossy:
        # A JPEG that had to change (turned upright, CMYK, downscaled) stays a JPEG: stored as a PNG
        # it would take 3-5 times the bytes to keep its compression artefacts exactly. Quality 95
        # without chroma subsampling: on the generated photos of tests/test_own_folder_e2e.py a
        # pixel moves by 0.9-2.9 levels in 255 on average (at most 9-21), which training cannot
        # tell from the noise of the original's own compression.
        image.save(buf, format="JPEG", quality=95, subsampling=0)
        return buf.getvalue(), "jpeg"
    image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue(), "png"


def _stored(ds: _Dataset, i: int, mode: str, max_side: int | None) -> tuple[bytes, str, str]:
    """What the shards hold for item ``i``: (bytes, format, why). The file's own bytes when they
    decode to what training needs (a grey file in a colour split too: turning it to RGB is exact);
    else the image made upright, converted and downscaled, as a JPEG when it came from one, a
    lossless PNG otherwise."""
    f = ds.facts[i]
    fits = max_side is None or max(f.size) <= max_side
    if ds.read is None:
        why = [f"from {f.kind}"]
    elif (f.source[0] in _KEEP_FORMATS and f.source[1] in (mode, "L" if mode == "RGB" else mode)
          and not f.rotated and fits):
        return ds.read(i), _KEEP_FORMATS[f.source[0]], "original"
    else:
        why = ["upright from EXIF"] if f.rotated else []
        if f.source[1] != mode:
            why.append(f"{f.source[1]} -> {mode}")
        if not fits:
            why.append(f"downscaled from {f.size[0]}x{f.size[1]}")
        if f.source[0] not in _KEEP_FORMATS:
            why.append(f"from {f.source[0]}")
    data, fmt = _encoded(downscale(convert_mode(ds.load(i), mode), max_side), f.source[0] in ("JPEG", "MPO"))
    return data, fmt, f"{fmt}: " + ", ".join(why)


def _report(ds: _Dataset, picks: dict[str, np.ndarray], mode: str, conflicts: list[list[str]],
            dropped: list[tuple[int, str, int, str]], source: str) -> dict:
    split_of = {int(i): s for s in SPLITS for i in picks[s]}
    counts = {s: {c: int((ds.labels[picks[s]] == k).sum()) for k, c in enumerate(ds.classes)} for s in SPLITS}
    used = sorted(split_of)
    duplicates: dict[int, dict] = {}
    leakage = []
    for i, split, kept, kept_split in dropped:
        if split == kept_split:
            duplicates.setdefault(kept, {"kept": ds.sources[kept], "split": split, "dropped": []})["dropped"].append(
                ds.sources[i])
        else:
            leakage.append({"dropped": ds.sources[i], "dropped_split": split,
                            "kept": ds.sources[kept], "kept_split": kept_split})
    thumbs = [ds.facts[i].thumb or thumbnail(ds.load(i)) for i in used]
    near = near_groups(thumbs, [ds.facts[i].digest for i in used])
    return {
        "source": source,
        "classes": ds.classes,
        "color_mode": mode,
        "counts": counts,
        "imbalance": {"all": imbalance({c: sum(counts[s][c] for s in SPLITS) for c in ds.classes}),
                      **{s: imbalance(counts[s]) for s in SPLITS}},
        "sizes": size_summary([ds.facts[i].size for i in used]),
        "formats": dict(Counter(ds.facts[i].kind for i in used).most_common()),
        "rotated": sum(ds.facts[i].rotated for i in used),
        "image_size_auto": auto_image_size([min(ds.facts[i].size) for i in used]),
        "duplicates": list(duplicates.values()),
        "conflicts": [{"files": f} for f in conflicts],
        "leakage": leakage,
        "near_duplicates": [{"files": [ds.sources[used[j]] for j in g], "splits": [split_of[used[j]] for j in g]}
                            for g in near],
        "quarantined": [{"file": f, "reason": r} for f, r in sorted(ds.quarantine)],
        "skipped": ds.skipped,
        "test_resolution": test_resolution(len(picks["test"])),
    }


def prepare_split(raw_dir: Path, cfg: SplitParams, *, seed: int) -> tuple[_Dataset, dict[str, np.ndarray], dict]:
    """Verify, de-duplicate and split what the download stage put in ``raw_dir``, writing nothing:
    the dataset, the picks per split and the data report (`cnnlab.data.report`)."""
    info = read_source_info(raw_dir)
    if info["format"] == "idx":
        ds = _from_idx(raw_dir)
    else:
        ds = _from_folder(raw_dir / "images", raw_dir, max_pixels=cfg.max_image_pixels,
                          skipped=info.get("skipped"))
    return _split(ds, cfg, seed=seed, source=info.get("path") or info.get("url") or info["source"])


def inspect_folder(folder: Path, cfg: SplitParams, *, seed: int, follow_outside: bool = False,
                   source: str | None = None) -> dict:
    """The data report of a folder as the pipeline would split it, writing nothing (paths in it are
    relative to ``folder``)."""
    ds = _from_folder(folder, folder, max_pixels=cfg.max_image_pixels, follow_outside=follow_outside)
    return _split(ds, cfg, seed=seed, source=source or str(folder))[2]


def _split(ds: _Dataset, cfg: SplitParams, *, seed: int, source: str) -> tuple[_Dataset, dict[str, np.ndarray], dict]:
    ds, conflicts = _drop_conflicts(ds)
    grey = all(f.mode == "L" for f in ds.facts)
    mode = {"grey": "L", "rgb": "RGB"}.get(cfg.color_mode, "L" if grey else "RGB")
    picks = stratified_split(
        ds.labels, ds.official, seed=seed, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
        caps={"train": cfg.max_train_per_class, "val": cfg.max_val_per_class, "test": cfg.max_test_per_class},
        class_names=ds.classes, calibration_fraction=cfg.calibration_fraction,
    )
    picks, dropped = drop_repeats(picks, [f.digest for f in ds.facts], SPLITS)
    return ds, picks, _report(ds, picks, mode, conflicts, dropped, source)


def run_split(raw_dir: Path, out_dir: Path, cfg: SplitParams, *, seed: int) -> dict:
    """Verify, split and write ``out_dir`` (see the module docstring); returns the data report."""
    ds, picks, report = prepare_split(raw_dir, cfg, seed=seed)
    mode = report["color_mode"]

    with staged_dir(out_dir) as tmp:
        for split in SPLITS:
            shards = ShardWriter(tmp, split, ds.classes)
            for i in progress(picks[split], desc=f"write {split}"):
                cls = ds.classes[ds.labels[i]]
                data, fmt, why = _stored(ds, int(i), mode, cfg.max_side)
                shards.add(data, key=f"{cls}/{ds.names[i]}", label=int(ds.labels[i]), cls=cls, source=ds.sources[i],
                           fmt=fmt, stored=why)
            stored = Counter("original" if r["stored"] == "original" else f"re-encoded {r['format']}"
                             for r in shards.close())
            report.setdefault("stored", {})[split] = dict(sorted(stored.items()))
        write_json(tmp / "classes.json", ds.classes)
        # Serving repeats these steps on raw uploads, so a served image gets the pixels this split gave.
        write_json(tmp / "preprocess.json", {"color_mode": mode, "max_side": cfg.max_side,
                                             "max_image_pixels": cfg.max_image_pixels})
        write_csv(tmp / "quarantine.csv", ("file", "reason"), report["quarantined"])
        write_json(tmp / "report.json", report)
        atomic_write_text(tmp / "report.md", markdown(report) + "\n")
    return report


def split_report(split_dir: Path) -> dict:
    """The data report `run_split` wrote (``report.json``)."""
    path = split_dir / "report.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: run the split stage first (`dvc repro split`)") from None


def resolve_image_size(image_size: int | str, split_dir: Path, kind: str, *, quiet: bool = False) -> int:
    """``image_size`` itself, or for "auto" what the data report chose for ``kind`` (said on stderr
    unless ``quiet``)."""
    if image_size != "auto":
        return int(image_size)
    size = int(split_report(split_dir)["image_size_auto"][kind])
    if not quiet:
        _log.info("%s image_size: auto -> %d px (%s, `image_size_auto`)", kind, size, split_dir / "report.json")
    return size
