"""``python -m cnnlab inspect PATH``: the data report of a folder or an archive, before any run.

It verifies every image, looks for duplicates, conflicting labels and leakage, and splits as the
`split` stage would with ``params.yaml``'s split settings and seed (the defaults where there is
no params file): what a run would train on, without DVC, MLflow or a single byte under ``data/``.
An archive is checked and extracted as the download stage does it, into a temporary folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cnnlab.cli.predict import CliError
from cnnlab.config import ConfigError, DownloadParams, Params, load_params
from cnnlab.data.archive import UnsafeArchiveError, safe_extract
from cnnlab.data.folders import LayoutError
from cnnlab.data.report import markdown
from cnnlab.data.sources import drop_stray_files
from cnnlab.data.split import SplitError, inspect_folder
from cnnlab.data.walk import merge_skipped


def _params(path: Path) -> Params:
    if not path.exists():
        return Params()
    try:
        return load_params(path)
    except ConfigError as e:
        raise CliError(str(e)) from None


def report_for(path: Path, params: Params, *, follow_outside: bool = False) -> dict:
    """The data report of folder or archive ``path``."""
    cfg, seed = params.split, params.base.seed
    try:
        if path.is_dir():
            return inspect_folder(path, cfg, seed=seed, follow_outside=follow_outside)
        if not path.is_file():
            raise CliError(f"{path}: no such folder or archive")
        with tempfile.TemporaryDirectory(prefix="cnnlab-inspect-") as tmp:
            limits: DownloadParams = params.download
            safe_extract(path, Path(tmp) / "images", max_members=limits.max_members,
                         max_total_bytes=limits.max_extracted_bytes,
                         max_compression_ratio=limits.max_compression_ratio)
            skipped = drop_stray_files(Path(tmp) / "images")
            report = inspect_folder(Path(tmp) / "images", cfg, seed=seed, source=str(path))
            report["skipped"] = merge_skipped(report["skipped"], skipped)
            return report
    except (LayoutError, SplitError, UnsafeArchiveError) as e:
        raise CliError(str(e)) from None


def run(path: Path, params_file: Path, *, as_json: bool, follow_outside: bool) -> int:
    report = report_for(path, _params(params_file), follow_outside=follow_outside)
    print(json.dumps(report, indent=2) if as_json else markdown(report))
    return 0
