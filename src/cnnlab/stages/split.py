"""Stage `split`: verify every image once, quarantine the bad ones, split train/val/test by class.

The work is `cnnlab.data.split.run_split` (the manifests, image copies and data report); the
stage adds the DVC metrics file with the report's numbers.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import SplitParams
from cnnlab.data.report import metrics as report_metrics
from cnnlab.data.split import run_split
from cnnlab.utils.files import write_json


def split(raw_dir: Path, out_dir: Path, metrics: Path, cfg: SplitParams, *, seed: int) -> dict:
    """Write ``out_dir`` (manifests, verified images, classes, quarantine list, data report) and
    ``metrics`` (the report's numbers); returns the data report."""
    report = run_split(raw_dir, out_dir, cfg, seed=seed)
    write_json(metrics, report_metrics(report))
    return report
