import csv
import dataclasses
import io
import json
import shutil
from pathlib import Path, PureWindowsPath

import numpy as np
import pytest
from PIL import Image

import cnnlab.data.split
from cnnlab.config import SplitParams
from cnnlab.data.folders import LayoutError, scan_image_folder
from cnnlab.data.idx import IdxFormatError
from cnnlab.data.images import IMAGE_EXTENSIONS
from cnnlab.data.report import metrics
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.split import SplitError, run_split, stratified_split
from conftest import make_image_folder

NAMES = ["a", "b", "c"]


def _split(labels, official=None, **kw):
    args = dict(seed=1, val_fraction=0.2, test_fraction=0.2, caps={}, class_names=NAMES)
    args.update(kw)
    return stratified_split(np.asarray(labels), official or [None] * len(labels), **args)


def test_stratified_disjoint_complete_and_balanced():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    picks = _split(labels)
    all_idx = np.concatenate(list(picks.values()))
    assert len(all_idx) == len(set(all_idx.tolist())) == 100  # disjoint, nothing lost
    for c, n in enumerate([50, 30, 20]):
        assert (labels[picks["test"]] == c).sum() == round(0.2 * n)
        assert (labels[picks["val"]] == c).sum() == round(0.2 * n)


def test_same_seed_same_split_other_seed_other_split():
    labels = np.repeat([0, 1, 2], 40)
    a, b, c = _split(labels), _split(labels), _split(labels, seed=2)
    assert all(np.array_equal(a[s], b[s]) for s in a)
    assert not np.array_equal(a["train"], c["train"])


def test_caps_limit_each_class_and_nest():
    labels = np.repeat([0, 1, 2], 100)
    small = _split(labels, caps={"train": 5, "val": 2, "test": 3})
    big = _split(labels, caps={"train": 10, "val": 2, "test": 3})
    assert [len(small[s]) for s in ("train", "val", "test")] == [15, 6, 9]
    assert set(small["train"].tolist()) <= set(big["train"].tolist())


def test_calibration_takes_its_share_of_each_class_s_validation_images():
    """calibration: the images evaluate fits temperatures and set thresholds on, which choose
    nothing. Carved out of the capped validation images, per class, at least one left in val."""
    labels = np.repeat([0, 1, 2], [100, 100, 6])
    whole = _split(labels, caps={"val": 10})
    parts = _split(labels, caps={"val": 10}, calibration_fraction=0.5)
    assert len(whole["calibration"]) == 0  # the default: none
    assert sorted([*parts["val"], *parts["calibration"]]) == sorted(whole["val"])  # the same images, shared out
    assert [int((labels[parts["calibration"]] == c).sum()) for c in range(3)] == [5, 5, 0]  # c had 1 val image
    assert [int((labels[parts["val"]] == c).sum()) for c in range(3)] == [5, 5, 1]
    assert np.array_equal(parts["train"], whole["train"]) and np.array_equal(parts["test"], whole["test"])
    lone = _split(np.repeat([0, 1, 2], [100, 100, 3]), calibration_fraction=0.9)
    assert int((np.repeat([0, 1, 2], [100, 100, 3])[lone["val"]] == 2).sum()) == 1  # never the last val image


def test_official_test_set_is_used_and_not_carved():
    labels = np.repeat([0, 1, 2], 20)
    official = ([None] * 15 + ["test"] * 5) * 3
    picks = _split(labels, official, test_fraction=0.5)
    test_marks = {official[i] for i in picks["test"]}
    assert test_marks == {"test"} and len(picks["test"]) == 15
    assert all(official[i] is None for i in np.concatenate([picks["train"], picks["val"]]))


def test_too_small_class_is_a_clear_error():
    labels = np.array([0] * 10 + [1] * 10 + [2] * 2)
    with pytest.raises(SplitError, match="class 'c' has no usable image for the (val|test) split .2 usable in all."):
        _split(labels)


def test_scan_finds_classes_official_splits_and_unwraps_folders(tmp_path: Path):
    root = tmp_path / "wrap" / "pizza_steak_sushi"
    make_image_folder(root / "train", {"pizza": 3, "steak": 2})
    make_image_folder(root / "test", {"pizza": 1, "steak": 1})
    (root / "train" / "pizza" / "notes.txt").write_text("not an image")
    classes, items, walk = scan_image_folder(tmp_path / "wrap", IMAGE_EXTENSIONS)
    assert classes == ["pizza", "steak"]
    assert sorted({it.official_split for it in items}) == ["test", "train"]
    assert len(items) == 7 and walk.stray == ["train/pizza/notes.txt"]


def test_scan_refuses_a_single_class(tmp_path: Path):
    make_image_folder(tmp_path / "root", {"only": 3})
    with pytest.raises(LayoutError, match="at least two"):
        scan_image_folder(tmp_path / "root", IMAGE_EXTENSIONS)


def _raw_folder(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    make_image_folder(raw / "images", {"cat": 12, "dog": 12}, mode="L")
    (raw / "source.json").write_text(json.dumps({"source": "local", "format": "image_folder"}))
    return raw


def _stored(out: Path, *splits: str) -> list[tuple[dict, bytes]]:
    """Each manifest row of ``splits`` with its image's stored bytes."""
    return [pair for s in splits for pair in zip(read_manifest(out, s), iter_images(out, s), strict=True)]


def _quarantine(out: Path) -> dict[str, str]:
    with open(out / "quarantine.csv", newline="") as fh:
        return {r["file"]: r["reason"] for r in csv.DictReader(fh)}


def test_run_split_quarantines_bad_files_and_keeps_going(tmp_path: Path):
    raw = _raw_folder(tmp_path)
    cat = raw / "images" / "cat"
    (cat / "empty.jpg").write_bytes(b"")
    (cat / "text.jpg").write_text("hello, I am not a JPEG")
    good = cat / "000.png"
    shutil.copy(good, cat / "cut.png")
    (cat / "cut.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    Image.new("RGB", (300, 300)).save(cat / "huge.png")
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None, max_val_per_class=None,
                      max_test_per_class=None, max_image_pixels=10_000, max_side=None, color_mode="auto")
    summary = metrics(run_split(raw, out, cfg, seed=0))
    q = _quarantine(out)
    assert set(q) == {f"images/cat/{n}" for n in ("empty.jpg", "text.jpg", "cut.png", "huge.png")}
    assert q["images/cat/empty.jpg"] == "empty file"
    assert q["images/cat/huge.png"].startswith("too large")
    assert summary["quarantined"] == 4
    # the huge image was RGB, but it is quarantined, so the usable data is all grey
    assert summary["color_mode"] == "L"
    stored = _stored(out, "train", "val", "calibration", "test")
    assert len(stored) == 24 and sum(summary[f"{s}_images"] for s in ("train", "val", "calibration", "test")) == 24
    assert summary["calibration_images"] > 0
    for r, data in stored:
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "L" and im.size == (24, 20)
        # a grey PNG in a grey split needs no change: the file's own bytes are stored
        assert (r["stored"], r["format"]) == ("original", "png"), r
        assert data == (raw / r["source"]).read_bytes(), r
    assert json.loads((out / "classes.json").read_text()) == ["cat", "dog"]


class _WindowsRelative(type(Path())):
    """A real file here whose path relative to a folder comes out as on Windows (backslashes)."""

    def relative_to(self, *other):
        return PureWindowsPath(*super().relative_to(*other).parts)


def test_manifest_sources_and_quarantine_are_posix_paths_on_windows_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    raw = _raw_folder(tmp_path)
    (raw / "images" / "cat" / "empty.jpg").write_bytes(b"")

    def scan_as_on_windows(*args, **kwargs):
        classes, items, skipped = scan_image_folder(*args, **kwargs)
        return classes, [dataclasses.replace(it, path=_WindowsRelative(it.path)) for it in items], skipped

    monkeypatch.setattr(cnnlab.data.split, "scan_image_folder", scan_as_on_windows)
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None, max_val_per_class=None,
                      max_test_per_class=None, max_image_pixels=10_000, max_side=None, color_mode="auto")
    run_split(raw, out, cfg, seed=0)
    assert list(_quarantine(out)) == ["images/cat/empty.jpg"]
    rows = [r for s in ("train", "val", "calibration", "test") for r in read_manifest(out, s)]
    assert sorted(r["source"] for r in rows) == sorted(f"images/{c}/{i:03d}.png" for c in ("cat", "dog")
                                                        for i in range(12))
    # keys: `<class>/<name>` with "/" (the name: the path under the class folder, flattened)
    assert sorted(r["key"] for r in rows) == sorted(f"{c}/{i:03d}_png" for c in ("cat", "dog") for i in range(12))


def test_run_split_from_idx_keeps_labels_with_images(tiny_idx: Path, tmp_path: Path):
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.25, test_fraction=0.15, max_train_per_class=5, max_val_per_class=2,
                      max_test_per_class=4, max_image_pixels=10_000, max_side=None, color_mode="rgb")
    summary = metrics(run_split(tiny_idx, out, cfg, seed=3))
    # 2 validation images per class, one of them kept apart for calibration
    assert (summary["train_images"], summary["val_images"], summary["calibration_images"],
            summary["test_images"]) == (50, 10, 10, 40)
    for split in ("train", "val", "calibration", "test"):
        for r, data in _stored(out, split):
            with Image.open(io.BytesIO(data)) as im:
                assert im.mode == "RGB" and im.format == "PNG"
                # the fixture made class c's pixels 20*c .. 20*c+9
                assert int(np.asarray(im).min()) // 20 == r["label"]
            assert ("t10k" in r["source"]) == (split == "test")
            assert (r["format"], r["stored"]) == ("png", "png: from IDX L")


def test_run_split_is_deterministic_and_a_failure_keeps_the_old_output(tiny_idx: Path, tmp_path: Path):
    cfg = SplitParams(val_fraction=0.25, test_fraction=0.15, max_train_per_class=5, max_val_per_class=2,
                      max_test_per_class=4, max_image_pixels=10_000, max_side=None, color_mode="auto")
    run_split(tiny_idx, tmp_path / "a", cfg, seed=3)
    run_split(tiny_idx, tmp_path / "b", cfg, seed=3)
    for name in ("train.csv", "val.csv", "test.csv", "shards.json"):  # shards.json: each shard's sha256
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    before = (tmp_path / "a" / "train.csv").read_bytes()
    (tiny_idx / "idx" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"broken")
    with pytest.raises(IdxFormatError, match=r"/idx/t10k-labels-idx1-ubyte\.gz: cannot read \(Not a gzipped file"):
        run_split(tiny_idx, tmp_path / "a", cfg, seed=3)
    assert (tmp_path / "a" / "train.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_max_side_downscales_big_images(tmp_path: Path):
    raw = tmp_path / "raw"
    make_image_folder(raw / "images", {"x": 6, "y": 6}, size=(200, 100))
    (raw / "source.json").write_text(json.dumps({"source": "local", "format": "image_folder"}))
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None, max_val_per_class=None,
                      max_test_per_class=None, max_image_pixels=10**6, max_side=50, color_mode="auto")
    run_split(raw, out, cfg, seed=0)
    (r, data), *_ = _stored(out, "train")
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (50, 25) and im.mode == "RGB"
    assert (r["format"], r["stored"]) == ("png", "png: downscaled from 200x100")


def test_color_mode_grey_turns_rgb_sources_into_one_channel_luma(tmp_path: Path):
    """split.color_mode: grey. make_image_folder paints class c's image i in (v, 255 - v, 100) with
    v = 40c + i; grey must give one L channel holding ITU-R 601 luma, 0.299 R + 0.587 G + 0.114 B."""
    raw = tmp_path / "raw"
    make_image_folder(raw / "images", {"x": 6, "y": 6}, size=(10, 8))
    (raw / "source.json").write_text(json.dumps({"source": "local", "format": "image_folder"}))
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None, max_val_per_class=None,
                      max_test_per_class=None, max_image_pixels=10**6, max_side=None, color_mode="grey")
    summary = metrics(run_split(raw, out, cfg, seed=0))
    assert summary["color_mode"] == "L"
    assert json.loads((out / "preprocess.json").read_text())["color_mode"] == "L"
    stored = _stored(out, "train", "val", "test")
    assert len(stored) == 12
    for r, data in stored:
        v = 40 * r["label"] + int(Path(r["source"]).stem)
        luma = 0.299 * v + 0.587 * (255 - v) + 0.114 * 100
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode == "L" and im.size == (10, 8)
            pixels = np.asarray(im)
        assert np.abs(pixels.astype(float) - luma).max() <= 1.0, (r["key"], luma, np.unique(pixels))
        assert (r["format"], r["stored"]) == ("png", "png: RGB -> L")
