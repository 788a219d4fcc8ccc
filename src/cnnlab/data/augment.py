"""The `augment` stage: the training augmentation policy, materialized as K seeded copies.

Writing the copies to disk (rather than augmenting on the fly) makes the `regularized` variant's
training data a DVC output: it is cached, versioned, inspectable, and reused until the policy
or the split changes.

The copies are made at the nets' input size (``augment.image_size``), from the decode cache's
array of the training images at that size: augmenting a 28 or 32 px image is cheap, a 512 px
photo is not, and the net never sees more than its input size. Images are independent, so the
work is spread over every core.

Output folder (``data/augmented``), in the split's layout (`cnnlab.data.shards`)::

    train-<i>-of-<n>.parquet    copy k of each training image as a PNG, key ``<original key>-aug<k>``
    train.csv  shards.json      manifest (``source``: the original's key in data/split/train.csv)
    policy.json                 the augment params that made them, ``image_size`` resolved

plus a preview grid (originals beside their copies) at a path of the caller's choosing.
"""

from __future__ import annotations

import io
import multiprocessing
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# The object API, not pyplot: importing cnnlab must not switch the caller's matplotlib backend.
from matplotlib.figure import Figure
from PIL import Image
from torchvision.transforms import v2

from cnnlab.config import AugmentParams
from cnnlab.data.decoded import cache_dir, cpu_count, decoded_path, open_array
from cnnlab.data.shards import ShardWriter, read_manifest
from cnnlab.data.tensors import split_classes, split_mode
from cnnlab.utils.files import staged_dir, write_json
from cnnlab.utils.progress import progress

# Below this many copies one process does it sooner than starting workers (forked: a few ms each;
# spawned, where fork is missing: each imports torch, ~2 s).
PARALLEL_MIN = 4_000
CHUNK = 256  # images per task handed to a worker

_AUTO = {
    "trivial_augment_wide": v2.TrivialAugmentWide,
    "auto_augment": v2.AutoAugment,  # ImageNet policy
    "rand_augment": v2.RandAugment,
}


def build_policy(p: AugmentParams) -> v2.Compose:
    """The training-time transform for uint8 CxHxW tensors; disabled parts are left out."""
    ops: list[v2.Transform] = []
    if p.hflip:
        ops.append(v2.RandomHorizontalFlip(p.hflip))
    if p.vflip:
        ops.append(v2.RandomVerticalFlip(p.vflip))
    if p.rotation or p.translate or p.shear or tuple(p.scale) != (1.0, 1.0):
        ops.append(v2.RandomAffine(degrees=p.rotation, translate=(p.translate, p.translate),
                                   scale=tuple(p.scale), shear=p.shear))
    cj = p.color_jitter
    if cj.brightness or cj.contrast or cj.saturation or cj.hue:
        ops.append(v2.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue))
    if p.auto_augment != "none":
        ops.append(_AUTO[p.auto_augment]())
    if p.random_erasing:
        # After the geometric ops so the erased box is not itself rotated off the image.
        ops.append(v2.RandomErasing(p.random_erasing, value=0))
    return v2.Compose(ops or [v2.Identity()])  # Compose refuses an empty list


def copy_seed(seed: int, index: int, copy: int) -> int:
    """Seed for one copy of one image: independent of processing order and of other images."""
    return int(np.random.SeedSequence([seed, index, copy]).generate_state(1)[0])


def to_image(tensor: torch.Tensor) -> Image.Image:
    arr = tensor.numpy()
    return Image.fromarray(arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0))


def augment_image(image: torch.Tensor, policy: v2.Compose, *, seed: int, index: int, copies: int) -> list[torch.Tensor]:
    """``copies`` augmented versions of one image, reproducible from (seed, index)."""
    out = []
    for k in range(copies):
        torch.manual_seed(copy_seed(seed, index, k))
        out.append(policy(image))
    return out


def preview_picks(labels: Sequence[int], n: int, seed: int) -> set[int]:
    """``n`` row indices, one random image per class in turn, so the grid shows every class."""
    rng = np.random.default_rng(seed)
    by_class = {c: list(rng.permutation([i for i, lab in enumerate(labels) if lab == c])) for c in sorted(set(labels))}
    picks: set[int] = set()
    while len(picks) < min(n, len(labels)):
        for pool in by_class.values():
            if pool and len(picks) < n:
                picks.add(int(pool.pop()))
    return picks


def save_preview(path: Path, rows: Sequence[tuple[str, torch.Tensor, list[torch.Tensor]]]) -> None:
    """A grid: one row per sampled image, its original first, then its copies."""
    n_cols = 1 + max(len(copies) for _, _, copies in rows)
    fig = Figure(figsize=(1.4 * n_cols, 1.5 * len(rows)))
    axes = fig.subplots(len(rows), n_cols, squeeze=False)
    for r, (cls, original, copies) in enumerate(rows):
        for c, ax in enumerate(axes[r]):
            if c > len(copies):
                ax.axis("off")
                continue
            img = (original if c == 0 else copies[c - 1]).permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=255)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(cls, rotation=0, ha="right", va="center", fontsize=8)
    axes[0][0].set_title("original", fontsize=8)
    for c in range(1, n_cols):
        axes[0][c].set_title(f"copy {c}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _png(tensor: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_image(tensor).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


_WORK: dict = {}


def _start_worker(array: Path, mode: str, size: int, cfg: dict, seed: int, copies: int) -> None:
    torch.set_num_threads(1)  # one image at a time is far too small to split across threads
    _WORK.update(images=open_array(array, mode=mode, size=size), policy=build_policy(AugmentParams(**cfg)),
                 seed=seed, copies=copies)


def _augment_rows(rows: range) -> list[list[bytes]]:
    w = _WORK
    return [[_png(t) for t in augment_image(torch.from_numpy(np.array(w["images"][i])), w["policy"], seed=w["seed"],
                                            index=i, copies=w["copies"])] for i in rows]


def run_augment(split_dir: Path, out_dir: Path, preview_path: Path, cfg: AugmentParams, *, seed: int,
                size: int) -> dict:
    """Write ``cfg.copies`` augmented versions of every training image at ``size`` px, plus a preview grid."""
    mode, rows = split_mode(split_dir), read_manifest(split_dir, "train")
    array = decoded_path(split_dir, "train", mode=mode, size=size, cache=cache_dir(split_dir))
    workers = min(cpu_count(), max(1, len(rows) * cfg.copies // PARALLEL_MIN))
    chunks = [range(a, min(a + CHUNK, len(rows))) for a in range(0, len(rows), CHUNK)]
    args = (array, mode, size, cfg.model_dump(), seed, cfg.copies)
    threads = torch.get_num_threads()
    try:
        with staged_dir(out_dir) as tmp:
            shards = ShardWriter(tmp, "train", split_classes(split_dir))
            if workers > 1:
                # fork where there is one: the workers start without importing torch again
                ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
                pool = ctx.Pool(workers, initializer=_start_worker, initargs=args)
                results = pool.imap(_augment_rows, chunks)
            else:
                pool = None
                _start_worker(*args)
                results = map(_augment_rows, chunks)
            try:
                bar = progress(range(len(rows)), desc=f"augment at {size} px ({workers} processes)")
                for chunk, pngs in zip(chunks, results, strict=True):
                    for i, copies in zip(chunk, pngs, strict=True):
                        row = rows[i]
                        for k, data in enumerate(copies):
                            shards.add(data, key=f"{row['key']}-aug{k}", label=row["label"], cls=row["class"],
                                       source=row["key"], fmt="png", stored="augmented")
                        next(bar, None)
            finally:
                if pool is not None:
                    pool.terminate()
            out_rows = shards.close()
            # The policy travels with its copies, so training can augment on the fly with it.
            # The size too: a variant that reads larger images than the copies says so (load_train).
            write_json(tmp / "policy.json", {**cfg.model_dump(), "image_size": size})
    finally:
        torch.set_num_threads(threads)
    _save_preview_of(preview_path, rows, open_array(array, mode=mode, size=size), cfg, seed=seed)
    return {"originals": len(rows), "copies_per_image": cfg.copies, "augmented_images": len(out_rows),
            "image_size": size}


def _save_preview_of(path: Path, rows: list[dict], images: np.ndarray, cfg: AugmentParams, *, seed: int) -> None:
    policy = build_policy(cfg)
    picks = preview_picks([r["label"] for r in rows], cfg.preview_images, seed)
    preview = []
    for i in sorted(picks):
        original = torch.from_numpy(np.array(images[i]))
        preview.append((rows[i]["class"], original,
                        augment_image(original, policy, seed=seed, index=i, copies=cfg.copies)[:6]))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_preview(path, sorted(preview, key=lambda r: r[0]))
