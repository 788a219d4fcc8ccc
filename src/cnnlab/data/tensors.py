"""Images as uint8 tensors at the model's input size: the fast data path.

Every epoch indexes one tensor instead of opening files and running PIL per sample. The tensors
are memory-mapped from the decode cache (`cnnlab.data.decoded`), which decodes each stored image
once per input size with `prepare`, the steps serving repeats on an upload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.decoded import cache_dir, decoded, decoded_path, open_array
from cnnlab.data.preprocess import Mode
from cnnlab.data.shards import read_manifest
from cnnlab.utils.files import atomic_write


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
    """The colour mode the split stage chose (every stored image decodes to it)."""
    return json.loads((split_dir / "preprocess.json").read_text(encoding="utf-8"))["color_mode"]


def split_classes(split_dir: Path) -> list[str]:
    return json.loads((split_dir / "classes.json").read_text(encoding="utf-8"))


def _labels(rows: list[dict]) -> torch.Tensor:
    return torch.tensor([r["label"] for r in rows], dtype=torch.int64)


def load_split(split_dir: Path, split: str, *, mode: Mode, size: int, limit: int | None = None) -> TensorSet:
    """The split's images in manifest order (the first ``limit`` only, when given), memory-mapped
    from the decode cache beside ``split_dir`` (`cnnlab.data.decoded`)."""
    images = decoded(split_dir, split, mode=mode, size=size, cache=cache_dir(split_dir))
    rows = read_manifest(split_dir, split)
    return TensorSet(torch.from_numpy(images[:limit]), _labels(rows[:limit]))


def check_copies_size(augmented_dir: Path, size: int) -> None:
    """Refuse copies smaller than the net reads: enlarged, they would train it on blurred images."""
    made = json.loads((augmented_dir / "policy.json").read_text(encoding="utf-8")).get("image_size", size)
    if made < size:
        raise ValueError(f"{augmented_dir} holds copies made at {made} px, smaller than the {size} px this variant "
                         f"reads: set augment.image_size: {size} in params.yaml (the copies are made at that size) "
                         "and run `dvc repro`")


def load_train(split_dir: Path, augmented_dir: Path | None, *, mode: Mode, size: int) -> TrainSet:
    """The split's training images, plus the augment stage's copies when ``augmented_dir`` is given
    (rows: the originals, then the copies, as `train_versions` orders them)."""
    originals, copies, versions = train_versions(split_dir, augmented_dir)
    cache = cache_dir(split_dir)
    first = decoded_path(split_dir, "train", mode=mode, size=size, cache=cache)
    if augmented_dir is None:
        return TrainSet(torch.from_numpy(open_array(first, mode=mode, size=size)), _labels(originals), versions)
    check_copies_size(augmented_dir, size)
    more = decoded_path(augmented_dir, "train", mode=mode, size=size, cache=cache)
    # One array for the engine to index: the two decoded ones side by side (copied, not decoded
    # again), kept in the cache under a name made of theirs.
    both = cache / f"{first.stem}+{more.stem}.npy"
    if not both.exists():
        a, b = (open_array(p, mode=mode, size=size) for p in (first, more))

        def fill(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(a) + len(b), *a.shape[1:]))
            out[:len(a)], out[len(a):] = a, b
            out.flush()

        atomic_write(both, fill)
        for stale in cache.glob(f"{first.stem}+*"):
            if stale != both:
                stale.unlink(missing_ok=True)
    images = open_array(both, mode=mode, size=size)
    return TrainSet(torch.from_numpy(images), _labels(originals + copies), versions)


def train_versions(split_dir: Path, augmented_dir: Path | None) -> tuple[list[dict], list[dict], torch.Tensor]:
    """The training manifest rows (originals, then the augment stage's copies) and the versions
    matrix of `TrainSet` over them, in that order: row ``i`` lists original ``i`` and its copies."""
    originals = read_manifest(split_dir, "train")
    copies = read_manifest(augmented_dir, "train") if augmented_dir else []
    index = {r["key"]: i for i, r in enumerate(originals)}
    per_image: list[list[int]] = [[i] for i in range(len(originals))]
    for j, row in enumerate(copies):
        try:
            per_image[index[row["source"]]].append(len(originals) + j)
        except KeyError:
            raise ValueError(
                f"{augmented_dir}/train.csv row {j + 2} refers to {row['source']!r}, which is not in "
                f"{split_dir}/train.csv: the augment stage is out of date, run `dvc repro`"
            ) from None
    width = {len(v) for v in per_image}
    if len(width) != 1:
        raise ValueError(f"{augmented_dir}: images have different numbers of augmented copies ({sorted(width)})")
    return originals, copies, torch.tensor(per_image, dtype=torch.int64)
