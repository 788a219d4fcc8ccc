"""A user's own photo folder (issue 22): safe walking, duplicates, conflicting labels, leakage, the
data report, `image_size: auto` and `python -m cnnlab inspect`, on small generated photo folders."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_image_folder
from photo_folder import add_hazards, make_photo_folder
from PIL import Image

from cnnlab.config import ConfigError, DownloadParams, Params, SplitParams, load_params
from cnnlab.data.duplicates import pixel_digest
from cnnlab.data.folders import scan_image_folder
from cnnlab.data.images import IMAGE_EXTENSIONS, load_image, load_image_bytes
from cnnlab.data.report import auto_image_size, half_width, images_to_separate, metrics
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.sources import copy_local_folder
from cnnlab.data.split import resolve_image_size, run_split
from cnnlab.data.walk import walk_images

SPLITS = ("train", "val", "calibration", "test")
# No caps: every usable image reaches a manifest, so "kept once" and "dropped" are exact.
UNCAPPED = {"max_train_per_class": None, "max_val_per_class": None, "max_test_per_class": None}
# Shorter sides of 66 px and more: `image_size: auto` gives scratch its 32 px cap.
SIZES = (66, 110)
# The quarantine reason of an image under two classes (a heading says "conflicting labels" anyway).
CONFLICT = "conflicting labels: the same image is under 'cat', 'dog'"
# A JPEG the split had to change (turned upright, CMYK -> RGB) is stored as a JPEG of quality 95,
# not exactly: its pixels are compared with a tolerance. On these grainy generated photos q95 moves
# a pixel by up to ~21 levels and ~2.9 on average (CMYK sources; EXIF-rotated ones ~13 and ~1.6),
# more than the 8 and 1.5 once planned; a wrong rotation or colour conversion moves them far more.
JPEG_MAX_DIFF, JPEG_MEAN_DIFF = 28, 3.5


def _rows(split_dir: Path) -> list[dict]:
    """Every manifest row, with its split and its stored image's bytes (``data``)."""
    return [dict(r, split=s, data=data) for s in SPLITS
            for r, data in zip(read_manifest(split_dir, s), iter_images(split_dir, s), strict=True)]


def _quarantine(split_dir: Path) -> dict[str, str]:
    with open(split_dir / "quarantine.csv", newline="", encoding="utf-8") as fh:
        return {r["file"]: r["reason"] for r in csv.DictReader(fh)}


def _digest_of_file(path: Path) -> str:
    return pixel_digest(load_image(path, max_pixels=10**8))


def _digest_of_bytes(data: bytes) -> str:
    return pixel_digest(load_image_bytes(data, max_pixels=10**8))


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A photo folder with every hazard, snapshotted as the download stage does and split once
    (shared: the tests below only read it)."""
    root = tmp_path_factory.mktemp("photos")
    made = make_photo_folder(root / "mine", {"cat": 12, "dog": 12, "fox": 12}, sizes=SIZES)
    hazards = add_hazards(root / "mine", outside=root / "outside")
    info = copy_local_folder(root / "raw", folder=root / "mine")
    report = run_split(root / "raw", root / "split", SplitParams(**UNCAPPED), seed=0)
    return SimpleNamespace(root=root, raw=root / "raw", split=root / "split", made=made, hazards=hazards,
                           info=info, report=report, rows=_rows(root / "split"))



def test_conflicting_labels_quarantine_every_copy(photos):
    """The same pixels under cat and dog: one label is wrong, so neither copy is used."""
    a, b = photos.hazards["conflict"]
    q = _quarantine(photos.split)
    for rel in (a, b):
        assert "conflicting labels" in q[f"images/{rel}"]
    sources = {r["source"] for r in photos.rows}
    assert f"images/{a}" not in sources and f"images/{b}" not in sources
    assert photos.report["conflicts"] == [{"files": [f"images/{a}", f"images/{b}"]}]
    assert metrics(photos.report)["conflicting_images"] == 2


def test_duplicate_is_kept_once_and_no_pixels_are_stored_twice(photos):
    """A photo saved twice in one class counts once, whichever split the copies landed in."""
    original, copy = (f"images/{p}" for p in photos.hazards["duplicate_in_class"][0])
    sources = [r["source"] for r in photos.rows]
    assert (original in sources) + (copy in sources) == 1
    listed = [(d["kept"], d["dropped"]) for d in photos.report["duplicates"]]
    listed += [(x["kept"], [x["dropped"]]) for x in photos.report["leakage"]]
    assert any({kept, *dropped} == {original, copy} for kept, dropped in listed), listed
    # Every stored image decodes to pixels no other manifest row has.
    digests = [_digest_of_bytes(r["data"]) for r in photos.rows]
    assert len(digests) == len(set(digests))


def test_near_duplicate_reported_and_unusable_files_quarantined(photos):
    """A re-encoded copy is reported, not removed; broken and empty files go to quarantine."""
    near = {f"images/{p}" for p in photos.hazards["near_duplicate"]}
    groups = [set(g["files"]) for g in photos.report["near_duplicates"]]
    assert near in groups
    assert near <= {r["source"] for r in photos.rows}
    q = _quarantine(photos.split)
    assert set(photos.made["broken"]) == {"cat/broken.jpg", "dog/empty.jpg"}
    assert q["images/dog/empty.jpg"] == "empty file"
    assert "images/cat/broken.jpg" in q
    assert len(photos.report["quarantined"]) == len(q) == 4  # the two broken files, the conflicting pair


def test_skipped_things_are_listed_in_source_json_and_the_report(photos):
    """The loop, the links out, stray files and the empty class are never copied but always said."""
    hz = photos.hazards
    source = json.loads((photos.raw / "source.json").read_text(encoding="utf-8"))
    for skipped in (source["skipped"], photos.report["skipped"]):
        assert skipped["loops"] == [hz["loop"]]
        assert sorted(skipped["outside"]) == sorted([hz["outside_file"], hz["outside_dir"]])
        assert skipped["empty_dirs"] == [hz["empty_class"]]
        assert {hz["stray"], "fox/notes.txt"} <= set(skipped["stray"])
    copied = {p.relative_to(photos.raw / "images").as_posix() for p in (photos.raw / "images").rglob("*")}
    for rel in (hz["loop"], hz["outside_file"], hz["outside_dir"], hz["empty_class"], hz["stray"],
                "fox/notes.txt", ".DS_Store"):
        assert rel not in copied
    assert not any(p.is_symlink() for p in photos.raw.rglob("*"))
    assert photos.report["classes"] == ["cat", "dog", "fox"]


def test_report_md_says_it_all(photos):
    md = (photos.split / "report.md").read_text(encoding="utf-8")
    hz = photos.hazards
    assert md.startswith("# Data report")
    assert "| cat |" in md and "| fox |" in md
    for text in (CONFLICT, *hz["conflict"], *hz["near_duplicate"], *hz["duplicate_in_class"][0],
                 "cat/broken.jpg", "dog/empty.jpg", hz["loop"], hz["outside_file"], hz["outside_dir"],
                 hz["empty_class"], hz["stray"], "fox/notes.txt"):
        assert text in md, text
    assert json.loads((photos.split / "report.json").read_text(encoding="utf-8")) == photos.report


def test_no_byte_of_an_outside_file_is_copied(photos):
    """Links out of the folder would put other files of the machine in data/ (and DVC's remote)."""
    outside = photos.hazards["outside_bytes"]
    assert len(outside) == 3
    for folder in (photos.raw, photos.split):
        for path in folder.rglob("*"):
            if path.is_file():
                assert path.read_bytes() not in outside, path
    # Nor inside the split's shards, which keep a JPEG's own bytes when it needs no change...
    assert not any(r["data"] in outside for r in photos.rows)
    # ...nor their pixels, re-encoded.
    theirs = {_digest_of_file(p) for p in (photos.root / "outside").rglob("*.jpg")}
    assert len(theirs) == 3
    assert theirs.isdisjoint(_digest_of_bytes(r["data"]) for r in photos.rows)


def test_stored_images_are_upright_rgb(photos):
    """EXIF-rotated JPEGs are stored upright; CMYK and RGBA (with alpha on white) are stored RGB."""
    by_source = {r["source"]: r for r in photos.rows}
    kinds = {"exif_rotated": 0, "cmyk": 0, "png_alpha": 0}
    for rel, meta in photos.made["images"].items():
        if meta["kind"] not in kinds or f"images/{rel}" not in by_source:
            continue
        kinds[meta["kind"]] += 1
        row = by_source[f"images/{rel}"]
        with Image.open(io.BytesIO(row["data"])) as stored:
            assert stored.mode == "RGB", rel
            pixels = np.asarray(stored)
            assert stored.size == tuple(meta["size"]), rel
        if meta["kind"] == "exif_rotated":
            # Stored sideways with orientation 6: turning the raw pixels 90 degrees clockwise is upright.
            with Image.open(photos.root / "mine" / rel) as raw:
                assert raw.size == tuple(meta["size"])[::-1]
                upright = np.asarray(raw.convert("RGB").rotate(-90, expand=True), dtype=np.int16)
            # Re-encoded as a JPEG (quality 95), not kept exactly: close to the upright pixels.
            diff = np.abs(pixels.astype(np.int16) - upright)
            assert diff.max() <= JPEG_MAX_DIFF and diff.mean() <= JPEG_MEAN_DIFF, (rel, diff.max(), diff.mean())
            assert (row["format"], row["stored"]) == ("jpeg", "jpeg: upright from EXIF"), rel
        if meta["kind"] == "png_alpha":  # the fully transparent corner shows white, not black
            assert (pixels[0, 0] == 255).all(), rel
            assert (row["format"], row["stored"]) == ("png", "png: RGBA -> RGB"), rel
        if meta["kind"] == "cmyk":  # colours survive (the stored mode is RGB whatever the source's)
            with Image.open(photos.root / "mine" / rel) as raw:
                assert raw.mode == "CMYK"
                rgb = np.asarray(raw.convert("RGB"), dtype=np.int16)
            # Converted, then re-encoded as a JPEG (quality 95): close to the source's colours.
            diff = np.abs(pixels.astype(np.int16) - rgb)
            assert diff.max() <= JPEG_MAX_DIFF and diff.mean() <= JPEG_MEAN_DIFF, (rel, diff.max(), diff.mean())
            assert np.abs(np.diff(pixels.astype(np.int16), axis=2)).max() > 40, rel  # not grey
            assert (row["format"], row["stored"]) == ("jpeg", "jpeg: CMYK -> RGB"), rel
    assert all(kinds.values()), kinds
    assert photos.report["rotated"] == kinds["exif_rotated"]


def test_files_that_need_no_change_are_stored_as_they_are(photos):
    """Plain and grey JPEGs (grey is exact in an RGB split) keep their own bytes; the rest are re-encoded."""
    kinds = {rel: meta["kind"] for rel, meta in photos.made["images"].items()}
    kept = 0
    for r in photos.rows:
        kind = kinds.get(r["source"].removeprefix("images/"))
        if kind in ("jpeg", "grey"):
            assert (r["stored"], r["format"]) == ("original", "jpeg"), r["source"]
        if r["stored"] == "original":
            kept += 1
            assert r["data"] == (photos.raw / r["source"]).read_bytes(), r["source"]
        else:
            assert kind in ("exif_rotated", "cmyk", "png_alpha"), (r["source"], r["stored"])
    assert kept >= len(photos.rows) // 2


def test_official_test_split_copy_of_a_training_image_is_leakage(tmp_path: Path):
    """The same file in train/cat and test/cat: the test copy goes, the training copy stays."""
    mine = tmp_path / "mine"
    make_photo_folder(mine / "train", {"cat": 6, "dog": 6}, seed=1, sizes=(30, 50), extras=False)
    make_photo_folder(mine / "test", {"cat": 3, "dog": 3}, seed=2, sizes=(30, 50), extras=False)
    (mine / "test/cat/leak.jpg").write_bytes((mine / "train/cat/img_0000.jpg").read_bytes())
    copy_local_folder(tmp_path / "raw", folder=mine)
    report = run_split(tmp_path / "raw", tmp_path / "split", SplitParams(**UNCAPPED), seed=0)
    assert len(report["leakage"]) == 1
    leak = report["leakage"][0]
    assert (leak["dropped"], leak["dropped_split"]) == ("images/test/cat/leak.jpg", "test")
    assert leak["kept"] == "images/train/cat/img_0000.jpg" and leak["kept_split"] in ("train", "val")
    where = {r["source"]: r["split"] for r in _rows(tmp_path / "split")}
    assert "images/test/cat/leak.jpg" not in where
    assert where["images/train/cat/img_0000.jpg"] == leak["kept_split"]
    assert report["counts"]["test"] == {"cat": 3, "dog": 3}
    assert metrics(report)["leakage_dropped"] == 1 and report["duplicates"] == []


def test_image_size_auto_follows_the_data(split_dir: Path, photos, tmp_path: Path):
    """Fashion-MNIST-like 28 px images stay 28 px; photos get 32 px; backbones always 128 px."""
    assert resolve_image_size("auto", split_dir, "scratch") == 28
    assert resolve_image_size("auto", split_dir, "feature_extract") == 128
    assert resolve_image_size("auto", photos.split, "scratch") == 32
    assert resolve_image_size("auto", photos.split, "feature_extract") == 128
    # A number is the number: the report is not even read.
    assert resolve_image_size(96, tmp_path / "no_split_here", "scratch") == 96
    assert auto_image_size([20, 24, 30])["scratch"] == 24  # small sources: their median, not upsampled
    assert auto_image_size([20, 300, 400])["scratch"] == 32  # photos: the cap
    assert Params().scratch.image_size == Params().feature_extract.image_size == "auto"


def test_class_weights_auto_weighs_only_an_imbalanced_set():
    import torch

    from cnnlab.training.losses import class_weights

    weights = class_weights("auto", torch.tensor([0] * 40 + [1] * 10), 2)
    assert weights is not None and weights[1] > weights[0]
    assert class_weights("auto", torch.tensor([0] * 20 + [1] * 10), 2) is not None  # 2x: the threshold
    assert class_weights("auto", torch.tensor([0] * 19 + [1] * 10), 2) is None
    assert class_weights("auto", torch.tensor([0, 1] * 10), 2) is None


def test_test_resolution_maths():
    assert half_width(5000, 0.9) == pytest.approx(0.0083, abs=1e-4)
    assert half_width(500, 0.9) > half_width(5000, 0.9)
    one_point = images_to_separate(0.85, 0.01)
    assert 19_000 <= one_point <= 20_000
    assert images_to_separate(0.85, 0.02) < one_point / 3  # ~1/gap^2


def test_walk_ends_loops_and_lists_what_it_skipped(tmp_path: Path):
    root = make_image_folder(tmp_path / "mine", {"cat": 2, "dog": 2}, ext="jpg")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside/secret.jpg").write_bytes(b"not yours")
    os.symlink("..", root / "cat/loop")
    os.symlink(tmp_path / "outside/secret.jpg", root / "dog/secret.jpg")
    try:
        os.close(os.open(bytes(root / "cat") + b"/bad\xffname.jpg", os.O_CREAT | os.O_WRONLY))
    except OSError:  # a filesystem that refuses non-UTF-8 names cannot hold this hazard
        pytest.skip("this filesystem refuses file names that are not UTF-8")
    (root / "zz_empty").mkdir()
    (root / "cat/notes.txt").write_text("hello")

    walk = walk_images(root, IMAGE_EXTENSIONS)
    mine = ["cat/000.jpg", "cat/001.jpg", "dog/000.jpg", "dog/001.jpg"]
    assert [p.relative_to(root).as_posix() for p in walk.files] == mine
    assert walk.loops == ["cat/loop"]
    assert walk.outside == ["dog/secret.jpg"]
    assert len(walk.odd_names) == 1 and walk.odd_names[0].startswith("cat/bad")
    assert walk.empty_dirs == ["zz_empty"] and walk.stray == ["cat/notes.txt"]
    assert set(walk.skipped()) == {"stray", "loops", "outside", "odd_names", "empty_dirs"}

    followed = walk_images(root, IMAGE_EXTENSIONS, follow_outside=True)
    assert root / "dog/secret.jpg" in followed.files and followed.outside == []

    classes, items, _ = scan_image_folder(root, IMAGE_EXTENSIONS)
    assert classes == ["cat", "dog"]
    assert sorted(it.path.relative_to(root).as_posix() for it in items) == mine

    # The snapshot obeys the same rule: the outside file is copied only when asked.
    copy_local_folder(tmp_path / "raw", folder=root)
    assert not (tmp_path / "raw/images/dog/secret.jpg").exists()
    copy_local_folder(tmp_path / "raw2", folder=root, follow_outside=True)
    assert (tmp_path / "raw2/images/dog/secret.jpg").read_bytes() == b"not yours"


def test_link_to_a_sibling_class_does_not_steal_its_images(tmp_path: Path):
    root = make_image_folder(tmp_path / "mine", {"cat": 3, "dog": 3, "emu": 3})
    os.symlink("../dog", root / "cat/alias")
    walk = walk_images(root, IMAGE_EXTENSIONS)
    assert walk.loops == ["cat/alias"]  # the second name, not the class folder
    classes, items, _ = scan_image_folder(root, IMAGE_EXTENSIONS)
    assert classes == ["cat", "dog", "emu"]
    assert sum(it.cls == "dog" for it in items) == 3


def test_local_dir_with_tilde_is_refused_naming_the_full_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """DVC would look for a folder named '~' in the repository: say so, and what to write instead."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    full = str(tmp_path / "home" / "photos")
    with pytest.raises(ValueError) as excinfo:
        DownloadParams(local_dir="~/photos")
    assert "'~'" in str(excinfo.value) and full in str(excinfo.value) and "DVC" in str(excinfo.value)
    params = tmp_path / "params.yaml"
    params.write_text("download:\n  source: local\n  local_dir: ~/photos\n")
    with pytest.raises(ConfigError, match="download.local_dir") as excinfo:
        load_params(params)
    assert "~" in str(excinfo.value) and full in str(excinfo.value)
    assert DownloadParams(local_dir=full).local_dir == full  # the full path is fine
    assert DownloadParams().follow_outside_links is False


def _inspect(cwd: Path, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab", "inspect", *map(str, args)], cwd=cwd, check=False,
                          capture_output=True, text=True, timeout=300)


def test_inspect_cli_reports_a_folder_and_an_archive_and_writes_nothing(tmp_path: Path):
    mine = tmp_path / "mine"
    make_photo_folder(mine, {"cat": 8, "dog": 8, "fox": 8}, sizes=(30, 50))
    hz = add_hazards(mine, outside=tmp_path / "outside")
    before = sorted((p.as_posix(), p.is_symlink()) for p in mine.rglob("*"))
    cwd = tmp_path / "cwd"  # no params.yaml: the defaults
    cwd.mkdir()

    md = _inspect(cwd, mine)
    assert md.returncode == 0, md.stderr
    assert md.stdout.startswith("# Data report")
    assert "| class | train | val | calibration | test |" in md.stdout and "| fox |" in md.stdout
    assert CONFLICT in md.stdout and hz["loop"] in md.stdout

    as_json = _inspect(cwd, mine, "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["classes"] == ["cat", "dog", "fox"]
    assert report["conflicts"] == [{"files": list(hz["conflict"])}]
    assert sorted(report["skipped"]["outside"]) == sorted([hz["outside_file"], hz["outside_dir"]])

    # An archive of it (its links left out: safe_extract refuses links that lead out).
    archive = tmp_path / "mine.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted(mine.rglob("*")):
            if p.is_file() and not p.is_symlink() and not any(q.is_symlink() for q in p.parents):
                tar.add(p, arcname=Path("photos", p.relative_to(mine)).as_posix())
    packed = _inspect(cwd, archive, "--json")
    assert packed.returncode == 0, packed.stderr
    from_archive = json.loads(packed.stdout)
    assert from_archive["source"] == str(archive)
    assert from_archive["counts"] == report["counts"]
    assert from_archive["conflicts"] == [{"files": [f"photos/{f}" for f in hz["conflict"]]}]  # paths in the archive
    packed_md = _inspect(cwd, archive)
    assert packed_md.returncode == 0 and packed_md.stdout.startswith("# Data report")
    assert CONFLICT in packed_md.stdout

    missing = _inspect(cwd, tmp_path / "no_such_folder")
    assert missing.returncode == 2
    assert "error:" in missing.stderr and "no_such_folder" in missing.stderr

    assert list(cwd.iterdir()) == []  # no data/, nothing at all
    assert sorted((p.as_posix(), p.is_symlink()) for p in mine.rglob("*")) == before
