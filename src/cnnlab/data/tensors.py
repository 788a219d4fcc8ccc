"""Images decoded once into uint8 tensors at the model's input size: the fast data path.

A split of 2,000 28x28 images is 1.5 MB as uint8, so every epoch indexes one tensor instead
of opening files and running PIL per sample. The PNGs come from the split/augment stages, so
they are already verified; `prepare` (shared with serving) does the resize.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from cnnlab.data.preprocess import Mode, prepare
from cnnlab.data.split import read_manifest
from cnnlab.utils.progress import progress


@dataclass
class TensorSet:
    """uint8 images (N, C, S, S) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class TrainSet(TensorSet):
    """Training images with their augmented versions.

    ``versions[i]`` lists the rows of ``images`` that show original image ``i`` (itself first,
    then its augmented copies); each epoch draws one version per image, so an epoch costs the
    same with or without augmentation.
    """

    versions: torch.Tensor  # (N_originals, 1 + copies) row indices into images


def split_mode(split_dir: Path) -> Mode:
    """The colour mode the split stage chose (all its PNGs share it)."""
    with Image.open(read_manifest(split_dir, "train")[0]["path"]) as im:
        return "L" if im.mode == "L" else "RGB"


def split_classes(split_dir: Path) -> list[str]:
    return json.loads((split_dir / "classes.json").read_text(encoding="utf-8"))


def _load(rows: list[dict], *, mode: Mode, size: int, desc: str) -> TensorSet:
    images = torch.empty((len(rows), 1 if mode == "L" else 3, size, size), dtype=torch.uint8)
    for i, row in enumerate(progress(rows, desc=desc)):
        with Image.open(row["path"]) as im:
            images[i] = prepare(im, mode=mode, size=size)
    return TensorSet(images, torch.tensor([r["label"] for r in rows], dtype=torch.int64))


def load_split(split_dir: Path, split: str, *, mode: Mode, size: int, limit: int | None = None) -> TensorSet:
    """The split's images in manifest order (the first ``limit`` only, when given)."""
    rows = read_manifest(split_dir, split)
    return _load(rows if limit is None else rows[:limit], mode=mode, size=size, desc=f"load {split}")


def load_train(split_dir: Path, augmented_dir: Path | None, *, mode: Mode, size: int) -> TrainSet:
    """The split's training images, plus the augment stage's copies when ``augmented_dir`` is given."""
    originals, copies, versions = train_versions(split_dir, augmented_dir)
    data = _load(originals + copies, mode=mode, size=size, desc="load train")
    return TrainSet(data.images, data.labels, versions)


def train_versions(split_dir: Path, augmented_dir: Path | None) -> tuple[list[dict], list[dict], torch.Tensor]:
    """The training manifest rows (originals, then the augment stage's copies) and the versions
    matrix of `TrainSet` over them, in that order: row ``i`` lists original ``i`` and its copies."""
    originals = read_manifest(split_dir, "train")
    copies = read_manifest(augmented_dir, "train") if augmented_dir else []
    # POSIX form, as the augment stage writes `source`, so the keys match on every OS.
    index = {Path(r["path"]).relative_to(split_dir).as_posix(): i for i, r in enumerate(originals)}
    per_image: list[list[int]] = [[i] for i in range(len(originals))]
    for j, row in enumerate(copies):
        try:
            per_image[index[row["source"]]].append(len(originals) + j)
        except KeyError:
            if "\\" in row["source"]:
                # Refused, not normalized: on Linux and macOS a backslash may be part of a file name.
                raise ValueError(
                    f"{augmented_dir}/train.csv row {j + 2}: source {row['source']!r} has backslashes, as an "
                    "older cnnlab wrote on Windows; sources are paths with '/', so re-run the augment stage "
                    "(`dvc repro augment`)"
                ) from None
            raise ValueError(
                f"{augmented_dir}/train.csv row {j + 2} refers to {row['source']!r}, which is not in "
                f"{split_dir}/train.csv: the augment stage is out of date, run `dvc repro`"
            ) from None
    width = {len(v) for v in per_image}
    if len(width) != 1:
        raise ValueError(f"{augmented_dir}: images have different numbers of augmented copies ({sorted(width)})")
    return originals, copies, torch.tensor(per_image, dtype=torch.int64)
