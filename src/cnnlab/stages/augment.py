"""Stage `augment`: K seeded augmented copies of every training image, and a preview grid.

The work is `cnnlab.data.augment.run_augment`; the stage resolves the size of the copies and adds
the DVC metrics file.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import AugmentParams
from cnnlab.data.augment import run_augment
from cnnlab.data.split import resolve_image_size
from cnnlab.utils.files import write_json


def copies_size(cfg: AugmentParams, scratch_image_size: int | str, split_dir: Path) -> int:
    """``augment.image_size``; ``auto`` is ``scratch.image_size`` (itself resolved from the data
    when ``auto``): the size the nets from scratch read, `regularized` among them. The stage
    cannot look at the variants: it would re-run whenever one is added (dvc.yaml's promise is that
    only the new variant's stage, evaluate and register do), so a variant that needs larger copies
    says so when it starts (`cnnlab.data.tensors.load_train`)."""
    if cfg.image_size != "auto":
        return int(cfg.image_size)
    return resolve_image_size(scratch_image_size, split_dir, "scratch", quiet=True)


def augment(split_dir: Path, out_dir: Path, preview: Path, metrics: Path, cfg: AugmentParams, *, seed: int,
            size: int) -> dict:
    """Write ``out_dir`` (shards, manifest, policy.json), the ``preview`` PNG and ``metrics``;
    returns the counts."""
    summary = run_augment(split_dir, out_dir, preview, cfg, seed=seed, size=size)
    write_json(metrics, summary)
    return summary
