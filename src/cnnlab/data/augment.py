"""The `augment` stage: the training augmentation policy, materialized as K seeded copies.

Writing the copies to disk (rather than augmenting on the fly) makes the `regularized` variant's
training data a DVC output: it is cached, versioned, inspectable, and reused until the policy
or the split changes.

Output folder (``data/augmented``)::

    images/<class>/<name>-aug<k>.png    copy k of each training image
    train.csv                           manifest: path, label, class, source (the original's path)
    policy.json                         the augment params that made them

plus a preview grid (originals beside their copies) at a path of the caller's choosing. The
manifest's paths are relative (``source`` to the split folder) and use '/' on every OS.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# The object API, not pyplot: importing cnnlab must not switch the caller's matplotlib backend.
from matplotlib.figure import Figure
from PIL import Image
from torchvision.transforms import v2

from cnnlab.config import AugmentParams
from cnnlab.data.split import MANIFEST_FIELDS, read_manifest
from cnnlab.utils.files import staged_dir, write_csv, write_json
from cnnlab.utils.progress import progress

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


def to_tensor(image: Image.Image) -> torch.Tensor:
    arr = np.array(image)  # a writable copy: torch refuses to share read-only buffers
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())


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


def run_augment(split_dir: Path, out_dir: Path, preview_path: Path, cfg: AugmentParams, *, seed: int) -> dict:
    """Write ``cfg.copies`` augmented versions of every training image plus a preview grid."""
    policy, copies, preview_images = build_policy(cfg), cfg.copies, cfg.preview_images
    rows = read_manifest(split_dir, "train")
    preview_idx = preview_picks([r["label"] for r in rows], preview_images, seed)
    preview = []
    out_rows = []
    threads = torch.get_num_threads()
    # One image at a time is far too small to split across threads: the threads' hand-offs cost
    # more than they save.
    torch.set_num_threads(1)
    try:
        with staged_dir(out_dir) as tmp:
            for i, row in enumerate(progress(rows, desc="augment")):
                with Image.open(row["path"]) as im:
                    original = to_tensor(im)
                augmented = augment_image(original, policy, seed=seed, index=i, copies=copies)
                stem = Path(row["path"]).stem
                (tmp / "images" / row["class"]).mkdir(parents=True, exist_ok=True)
                for k, tensor in enumerate(augmented):
                    rel = f"images/{row['class']}/{stem}-aug{k}.png"
                    to_image(tensor).save(tmp / rel, format="PNG", compress_level=3)
                    out_rows.append({"path": rel, "label": row["label"], "class": row["class"],
                                     "source": Path(row["path"]).relative_to(split_dir).as_posix()})
                if i in preview_idx:
                    preview.append((row["class"], original, augmented[:6]))
            write_csv(tmp / "train.csv", MANIFEST_FIELDS, out_rows)
            # The policy travels with its copies, so training can augment on the fly with it.
            write_json(tmp / "policy.json", cfg.model_dump())
    finally:
        torch.set_num_threads(threads)
    preview_path.parent.mkdir(parents=True, exist_ok=True)
    save_preview(preview_path, sorted(preview, key=lambda r: r[0]))
    return {"originals": len(rows), "copies_per_image": copies, "augmented_images": len(out_rows)}
