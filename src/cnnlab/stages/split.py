"""Stage `split`: verify every image once, quarantine the bad ones, split train/val/test by class.

The work is `cnnlab.data.split.run_split` (the manifests and image copies); the stage adds the
DVC metrics file with its counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cnnlab.data.split import run_split
from cnnlab.files import write_json


def split(
    raw_dir: Path,
    out_dir: Path,
    metrics: Path,
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    max_train_per_class: int | None,
    max_val_per_class: int | None,
    max_test_per_class: int | None,
    max_image_pixels: int,
    max_side: int | None,
    color_mode: Literal["auto", "rgb", "grey"],
) -> dict:
    """Write ``out_dir`` (manifests, verified images, classes, quarantine report) and ``metrics``;
    returns the counts."""
    summary = run_split(raw_dir, out_dir, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
                        max_train_per_class=max_train_per_class, max_val_per_class=max_val_per_class,
                        max_test_per_class=max_test_per_class, max_image_pixels=max_image_pixels,
                        max_side=max_side, color_mode=color_mode)
    write_json(metrics, summary)
    return summary
