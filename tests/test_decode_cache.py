"""Sharded storage (`cnnlab.data.shards`) and the decode cache (`cnnlab.data.decoded`): images
stored as a few Parquet files, decoded once per input size, the same pixels serving computes."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from photo_folder import make_photo_folder
from PIL import Image

import cnnlab.data.augment
import cnnlab.data.decoded
import cnnlab.data.shards
from cnnlab.config import AugmentParams, SplitParams
from cnnlab.data.augment import run_augment
from cnnlab.data.decoded import cache_dir, decoded
from cnnlab.data.images import load_image
from cnnlab.data.preprocess import prepare
from cnnlab.data.shards import ShardWriter, content_digest, iter_images, read_manifest
from cnnlab.data.sources import copy_local_folder
from cnnlab.data.split import run_split
from cnnlab.data.tensors import load_split, load_train

PHOTO_SPLIT = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=None, max_val_per_class=None,
                          max_test_per_class=None, max_image_pixels=10**7, max_side=320, color_mode="auto")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A split of a small photo folder: JPEGs of 220-480 px, PNG with alpha, CMYK, grey and
    EXIF-rotated JPEGs, a few broken files; max_side 320 downscales some."""
    root = tmp_path_factory.mktemp("photos")
    make_photo_folder(root / "local", {"ant": 14, "bee": 10, "cat": 8}, seed=3, sizes=(200, 420))
    copy_local_folder(root / "raw", folder=root / "local", follow_outside=False)
    run_split(root / "raw", root / "split", PHOTO_SPLIT, seed=0)
    return root


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    real = cnnlab.data.decoded.decode_stored

    def counting(data: bytes) -> Image.Image:
        calls[0] += 1
        return real(data)

    monkeypatch.setattr(cnnlab.data.decoded, "decode_stored", counting)
    return calls


def test_shards_round_trip_in_order_across_shards_and_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(cnnlab.data.shards, "SHARD_BYTES", 2_000)
    monkeypatch.setattr(cnnlab.data.shards, "GROUP_ROWS", 3)
    images = [bytes([i]) * (100 + 37 * i) for i in range(25)]
    w = ShardWriter(tmp_path, "train", ["a", "b"])
    for i, data in enumerate(images):
        w.add(data, key=f"a/{i}", label=i % 2, cls="ab"[i % 2], source=f"images/{i}.jpg", fmt="jpeg", stored="original")
    w.close()
    files = sorted(p.name for p in tmp_path.glob("train-*.parquet"))
    assert len(files) > 2 and files[0] == f"train-00000-of-{len(files):05d}.parquet"
    assert list(iter_images(tmp_path, "train")) == images
    assert list(iter_images(tmp_path, "train", limit=4)) == images[:4]
    rows = read_manifest(tmp_path, "train")
    assert [r["key"] for r in rows] == [f"a/{i}" for i in range(25)] and rows[7]["label"] == 1
    # Each row says where its bytes are.
    for r, data in zip(rows, images, strict=True):
        table = pq.read_table(tmp_path / r["shard"])
        assert table.column("image")[r["row"]].as_py()["bytes"] == data
    # Other tools read it: pandas, and Hugging Face's features in the schema metadata.
    frame = pd.concat([pd.read_parquet(tmp_path / f) for f in files])
    assert frame["label"].tolist() == [i % 2 for i in range(25)]
    features = json.loads(pq.read_schema(tmp_path / files[0]).metadata[b"huggingface"])["info"]["features"]
    assert features["image"] == {"_type": "Image"} and features["label"]["names"] == ["a", "b"]
    index = json.loads((tmp_path / "shards.json").read_text())["train"]
    assert [e["file"] for e in index] == files and sum(e["rows"] for e in index) == 25


def test_empty_split_still_has_a_shard(tmp_path: Path):
    ShardWriter(tmp_path, "test", ["a"]).close()
    assert list(iter_images(tmp_path, "test")) == [] and read_manifest(tmp_path, "test") == []
    array = decoded(tmp_path, "test", mode="L", size=8, cache=tmp_path / "cache")
    assert array.shape == (0, 1, 8, 8)


def test_photos_stored_as_few_files_with_their_own_bytes(photos: Path):
    split = photos / "split"
    assert len([p for p in split.rglob("*") if p.is_file()]) < 20
    rows = [r for s in ("train", "val", "calibration", "test") for r in read_manifest(split, s)]
    kept = [r for r in rows if r["stored"] == "original"]
    assert kept and any(r["format"] == "jpeg" for r in kept)
    stored = {r["key"]: data for s in ("train", "val", "calibration", "test")
              for r, data in zip(read_manifest(split, s), iter_images(split, s), strict=True)}
    for r in kept:
        assert stored[r["key"]] == (photos / "raw" / r["source"]).read_bytes(), r
    downscaled = [r for r in rows if "downscaled" in r["stored"]]
    assert downscaled, "max_side 320 must downscale some of the 200-420 px photos"
    for r in downscaled:
        with Image.open(io.BytesIO(stored[r["key"]])) as im:
            assert max(im.size) == 320 and im.mode == "RGB"


def test_decode_cache_gives_the_pixels_serving_computes(photos: Path):
    """Each cached image is `prepare(load_image(stored bytes))`, what serving does to an upload;
    for a file kept as it was, that is exactly what serving does to the user's own file."""
    split = photos / "split"
    for size in (24, 64):
        array = decoded(split, "val", mode="RGB", size=size, cache=cache_dir(split))
        for r, data, row in zip(read_manifest(split, "val"), iter_images(split, "val"), array, strict=True):
            from_stored = prepare(load_image_bytes_(data), mode="RGB", size=size)
            assert torch.equal(torch.from_numpy(np.array(row)), from_stored), r
            if r["stored"] == "original":
                served = prepare(load_image(photos / "raw" / r["source"], max_pixels=10**8), mode="RGB", size=size)
                assert torch.equal(torch.from_numpy(np.array(row)), served), r


def load_image_bytes_(data: bytes) -> Image.Image:
    from cnnlab.data.images import load_image_bytes

    return load_image_bytes(data, max_pixels=10**8)


def test_each_image_decoded_once_per_size_across_stages(photos: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """The stages' reads in pipeline order, at two sizes: every stored image is decoded once per
    size; the second reader of a size decodes nothing."""
    split = tmp_path / "split"
    shutil.copytree(photos / "split", split)
    n = {s: len(read_manifest(split, s)) for s in ("train", "val", "test")}
    calls = _count_decodes(monkeypatch)
    run_augment(split, tmp_path / "augmented", tmp_path / "preview.png", AugmentParams(copies=2, preview_images=2),
                seed=0, size=32)  # decodes train at 32 (then encodes the copies)
    assert calls[0] == n["train"]
    plain = load_train(split, None, mode="RGB", size=32)  # scratch@scratch
    both = load_train(split, tmp_path / "augmented", mode="RGB", size=32)  # scratch@regularized
    load_split(split, "val", mode="RGB", size=32)
    load_split(split, "val", mode="RGB", size=32)
    copies = 2 * n["train"]
    assert calls[0] == n["train"] + copies + n["val"]
    assert torch.equal(both.images[:n["train"]], plain.images) and len(both.images) == n["train"] + copies
    for _ in range(2):  # feature_extract, fine_tune, evaluate at 64 px
        load_train(split, None, mode="RGB", size=64)
        load_split(split, "val", mode="RGB", size=64)
        load_split(split, "test", mode="RGB", size=64)
    assert calls[0] == n["train"] + copies + n["val"] + sum(n.values())


def test_new_data_replaces_the_cached_array(tmp_path: Path, tiny_idx: Path):
    cfg = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=2, max_val_per_class=1,
                      max_test_per_class=1, max_image_pixels=10_000, max_side=None, color_mode="auto")
    split = tmp_path / "split"
    run_split(tiny_idx, split, cfg, seed=0)
    first = load_split(split, "train", mode="L", size=16).images.clone()
    run_split(tiny_idx, split, cfg, seed=1)  # another seed: other images
    second = load_split(split, "train", mode="L", size=16).images
    assert not torch.equal(first, second)
    assert len(list(cache_dir(split).glob("split-train-16px-L-*.npy"))) == 1  # the stale one is gone


def test_a_failed_build_leaves_nothing(photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    split = tmp_path / "split"
    shutil.copytree(photos / "split", split)
    seen = [0]

    def broken(data: bytes) -> Image.Image:
        seen[0] += 1
        if seen[0] == 5:
            raise OSError("disk gone")
        return Image.new("RGB", (40, 40))

    monkeypatch.setattr(cnnlab.data.decoded, "decode_stored", broken)
    with pytest.raises(OSError, match="disk gone"):
        decoded(split, "train", mode="RGB", size=16, cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())


def test_a_wrong_array_is_refused_with_what_to_do(photos: Path, tmp_path: Path):
    split = tmp_path / "split"
    shutil.copytree(photos / "split", split)
    cache = tmp_path / "cache"
    decoded(split, "val", mode="RGB", size=16, cache=cache)
    (path,) = cache.glob("*.npy")
    np.save(path, np.zeros((3, 1, 16, 16), np.uint8))
    with pytest.raises(ValueError, match=f"delete {cache}"):
        decoded(split, "val", mode="RGB", size=16, cache=cache)


def test_digest_follows_the_bytes(photos: Path, tmp_path: Path):
    split = tmp_path / "split"
    shutil.copytree(photos / "split", split)
    before = content_digest(split, "val")
    index = json.loads((split / "shards.json").read_text())
    index["val"][0]["sha256"] = "0" * 64
    (split / "shards.json").write_text(json.dumps(index))
    assert content_digest(split, "val") != before


def test_parallel_augment_writes_what_one_process_writes(photos: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch):
    cfg = AugmentParams(copies=2, preview_images=2)
    run_augment(photos / "split", tmp_path / "one", tmp_path / "one.png", cfg, seed=5, size=24)
    monkeypatch.setattr(cnnlab.data.augment, "PARALLEL_MIN", 8)
    monkeypatch.setattr(cnnlab.data.augment, "cpu_count", lambda: 2)
    monkeypatch.setattr(cnnlab.data.augment, "CHUNK", 3)
    summary = run_augment(photos / "split", tmp_path / "two", tmp_path / "two.png", cfg, seed=5, size=24)
    assert summary["augmented_images"] == 2 * len(read_manifest(photos / "split", "train"))
    assert list(iter_images(tmp_path / "one", "train")) == list(iter_images(tmp_path / "two", "train"))
    assert (tmp_path / "one" / "train.csv").read_bytes() == (tmp_path / "two" / "train.csv").read_bytes()
