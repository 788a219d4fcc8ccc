import csv
import hashlib
import io
import re
from pathlib import Path, PureWindowsPath

import pytest
import torch
from PIL import Image

import cnnlab.data.augment
import cnnlab.data.tensors
from cnnlab.config import AugmentParams, SplitParams
from cnnlab.data.augment import augment_image, build_policy, preview_picks, run_augment
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.split import run_split
from cnnlab.data.tensors import load_train

SIZE = 28  # the tiny split's images: the copies are made at this input size


@pytest.fixture
def split_dir(tiny_idx: Path, tmp_path: Path) -> Path:
    out = tmp_path / "split"
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=3, max_val_per_class=1,
                      max_test_per_class=1, max_image_pixels=10_000, max_side=None, color_mode="auto")
    run_split(tiny_idx, out, cfg, seed=0)
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_copies_manifest_and_preview(split_dir: Path, tmp_path: Path):
    out, preview = tmp_path / "aug", tmp_path / "plots" / "preview.png"
    summary = run_augment(split_dir, out, preview, AugmentParams(copies=2, preview_images=4), seed=1, size=SIZE)
    assert summary == {"originals": 30, "copies_per_image": 2, "augmented_images": 60, "image_size": SIZE}
    rows = read_manifest(out, "train")
    assert len(rows) == 60
    originals = {r["key"]: r for r in read_manifest(split_dir, "train")}
    for i, (r, data) in enumerate(zip(rows, iter_images(out, "train"), strict=True)):
        src = originals[r["source"]]  # the original's key in the split's train.csv
        assert r["key"] == f"{src['key']}-aug{i % 2}"
        assert (r["label"], r["class"]) == (src["label"], src["class"])  # labels travel with copies
        assert r["format"] == "png"
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size == (SIZE, SIZE) and im.mode == "L"
    with Image.open(preview) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_same_seed_same_bytes_other_seed_other_bytes(split_dir: Path, tmp_path: Path):
    policy = AugmentParams(copies=2, preview_images=2)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        run_augment(split_dir, tmp_path / name, tmp_path / f"{name}.png", policy, seed=seed, size=SIZE)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def _column(csv_file: Path, name: str) -> list[str]:
    with open(csv_file, newline="", encoding="utf-8") as fh:
        return [row[name] for row in csv.DictReader(fh)]


def test_sources_are_posix_keys_on_windows_too(split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # What pathlib.Path is on Windows: the same parts, joined by str() with backslashes.
    monkeypatch.setattr(cnnlab.data.augment, "Path", PureWindowsPath)
    run_augment(split_dir, tmp_path / "aug", tmp_path / "preview.png", AugmentParams(copies=2, preview_images=2),
                seed=1, size=SIZE)
    sources = _column(tmp_path / "aug" / "train.csv", "source")
    keys = _column(tmp_path / "aug" / "train.csv", "key")
    assert sources and not any("\\" in s for s in sources + keys)
    # the split's `key` column: `<class>/<name>` with '/'
    split_keys = _column(split_dir / "train.csv", "key")
    assert all(k.count("/") == 1 for k in split_keys)
    assert sources == [k for k in split_keys for _ in range(2)]
    assert keys == [f"{k}-aug{c}" for k in split_keys for c in range(2)]


def test_train_set_finds_copies_by_posix_source_on_windows_too(
    split_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    run_augment(split_dir, tmp_path / "aug", tmp_path / "preview.png", AugmentParams(copies=2, preview_images=2),
                seed=1, size=SIZE)
    monkeypatch.setattr(cnnlab.data.tensors, "Path", PureWindowsPath)  # as on Windows
    data = load_train(split_dir, tmp_path / "aug", mode="L", size=SIZE)
    assert data.versions.tolist() == [[i, 30 + 2 * i, 31 + 2 * i] for i in range(30)]


def test_train_set_refuses_backslash_sources_with_what_to_do(split_dir: Path, tmp_path: Path):
    """A source written with backslashes (as an older cnnlab wrote paths on Windows) is refused, not
    normalized: on Linux and macOS a backslash may be part of a class or file name."""
    aug = tmp_path / "aug"
    run_augment(split_dir, aug, tmp_path / "preview.png", AugmentParams(copies=1, preview_images=2), seed=1,
                size=SIZE)
    text = (aug / "train.csv").read_text(encoding="utf-8")
    first = _column(aug / "train.csv", "source")[0]
    windows = first.replace("/", "\\")
    # the first row's source only (its key starts with the same text: replace after the key's comma)
    (aug / "train.csv").write_text(text.replace(f",{first},", f",{windows},", 1), encoding="utf-8")
    assert _column(aug / "train.csv", "source")[0] == windows
    refused = (r"train.csv row 2 refers to " + re.escape(repr(windows))
               + r", which is not in .*train.csv: the augment stage is out of date, run `dvc repro`")
    with pytest.raises(ValueError, match=refused):
        load_train(split_dir, aug, mode="L", size=SIZE)


def test_copies_actually_differ_from_the_original():
    img = torch.arange(28 * 28, dtype=torch.int64).reshape(1, 28, 28).remainder(256).to(torch.uint8)
    copies = augment_image(img, build_policy(AugmentParams(hflip=1.0)), seed=0, index=0, copies=3)
    assert all(not torch.equal(c, img) for c in copies)
    assert not torch.equal(copies[0], copies[1])


@pytest.mark.parametrize("auto", ["none", "trivial_augment_wide", "auto_augment", "rand_augment"])
@pytest.mark.parametrize("channels", [1, 3])
def test_every_policy_option_runs_on_grey_and_colour(auto: str, channels: int):
    p = AugmentParams(vflip=0.5, auto_augment=auto, random_erasing=1.0,
                      color_jitter={"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1})
    img = torch.randint(0, 256, (channels, 32, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    (out,) = augment_image(img, build_policy(p), seed=0, index=0, copies=1)
    assert out.shape == img.shape and out.dtype == torch.uint8


def test_disabled_policy_is_identity():
    p = AugmentParams(hflip=0.0, rotation=0.0, translate=0.0, scale=[1.0, 1.0], shear=0.0,
                      color_jitter={}, random_erasing=0.0)
    img = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert all(torch.equal(c, img) for c in augment_image(img, build_policy(p), seed=0, index=0, copies=2))


def test_preview_covers_every_class_first():
    labels = [0] * 50 + [1] * 3 + [2] * 3
    picks = preview_picks(labels, 3, seed=0)
    assert sorted(labels[i] for i in picks) == [0, 1, 2]
    assert len(preview_picks(labels, 100, seed=0)) == len(labels)


def test_copies_are_made_at_augment_image_size_and_auto_is_scratch_s(split_dir: Path):
    from cnnlab.stages.augment import copies_size

    assert copies_size(AugmentParams(image_size=40), "auto", split_dir) == 40
    assert copies_size(AugmentParams(), 36, split_dir) == 36
    assert copies_size(AugmentParams(), "auto", split_dir) == 28  # the tiny split's native size


def test_a_variant_that_reads_larger_copies_says_what_to_set(split_dir: Path, tmp_path: Path):
    run_augment(split_dir, tmp_path / "aug", tmp_path / "p.png", AugmentParams(copies=1, preview_images=1), seed=0,
                size=20)
    assert len(load_train(split_dir, tmp_path / "aug", mode="L", size=16).images) == 60  # smaller: resized down
    with pytest.raises(ValueError, match=r"copies made at 20 px, smaller than the 28 px .* augment\.image_size: 28"):
        load_train(split_dir, tmp_path / "aug", mode="L", size=28)
