"""End to end (issue 22): a real `dvc repro split` on a user's own photo folder with every hazard
(a symlink loop, links out of the folder, a conflicting label, odd names) in a git + DVC workspace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.workspace import git_workspace, run
from photo_folder import add_hazards, make_photo_folder

from cnnlab.data.duplicates import pixel_digest
from cnnlab.data.images import load_image
from cnnlab.data.split import read_manifest

pytestmark = pytest.mark.slow


def test_own_photo_folder_with_hazards_through_dvc(tmp_path: Path):
    # No caps: every usable image (the odd-named ones too) must reach a manifest. Fractions other
    # than the defaults: `inspect` must split as the workspace's params.yaml says.
    ws = git_workspace(tmp_path / "ws", download={"source": "local", "local_dir": "data/local"},
                       split={"max_train_per_class": None, "max_val_per_class": None, "max_test_per_class": None,
                              "val_fraction": 0.25, "test_fraction": 0.25})
    local = ws / "data/local"  # gitignored but for its README.md; a DVC dependency of download
    make_photo_folder(local, {"cat": 10, "dog": 10, "fox": 10}, sizes=(40, 80))
    hz = add_hazards(local, outside=tmp_path / "outside")

    run(ws, "dvc", "repro", "split")

    md = (ws / "data/split/report.md").read_text(encoding="utf-8")
    conflict = "conflicting labels: the same image is under 'cat', 'dog'"  # the quarantine's reason
    for text in (hz["loop"], hz["outside_file"], hz["outside_dir"], conflict, *hz["conflict"]):
        assert text in md, text
    sources = {r["source"] for s in ("train", "val", "test") for r in read_manifest(ws / "data/split", s)}
    for rel in hz["odd_names"]:  # a space, non-ASCII letters, a newline: all usable
        assert f"images/{rel}" in sources, rel
    assert json.loads((ws / "data/metrics/split.json").read_text())["conflicting_images"] == 2

    # Nothing of the files outside the folder reached data/ or DVC's cache: not their bytes...
    outside = hz["outside_bytes"]
    assert len(outside) == 3
    for folder in (ws / "data", ws / ".dvc/cache"):
        files = [p for p in folder.rglob("*") if p.is_file() and local not in p.parents]
        assert len(files) > 30, folder  # the raw copy, the split's PNGs, their cached copies
        for path in files:
            assert path.read_bytes() not in outside, path
    # ...nor their pixels, re-encoded as the split's PNGs.
    theirs = {pixel_digest(load_image(p, max_pixels=10**8)) for p in (tmp_path / "outside").rglob("*.jpg")}
    stored = {pixel_digest(load_image(p, max_pixels=10**8)) for p in (ws / "data/split/images").rglob("*.png")}
    assert len(theirs) == 3 and theirs.isdisjoint(stored)

    # `inspect` on the same folder, with the workspace's params, reports what the split did.
    inspected = json.loads(run(ws, "python", "-m", "cnnlab", "inspect", "data/local", "--json").stdout)
    split_report = json.loads((ws / "data/split/report.json").read_text(encoding="utf-8"))
    assert inspected["counts"] == split_report["counts"]
    assert len(inspected["conflicts"]) == len(split_report["conflicts"]) == 1
