"""Stage `augment`: K seeded augmented copies of every training image, and a preview grid.

The work is `cnnlab.data.augment.run_augment`; the stage adds the DVC metrics file.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import AugmentParams
from cnnlab.data.augment import run_augment
from cnnlab.utils.files import write_json


def augment(split_dir: Path, out_dir: Path, preview: Path, metrics: Path, cfg: AugmentParams, *, seed: int) -> dict:
    """Write ``out_dir`` (images, manifest, policy.json), the ``preview`` PNG and ``metrics``;
    returns the counts."""
    summary = run_augment(split_dir, out_dir, preview, cfg, seed=seed)
    write_json(metrics, summary)
    return summary
