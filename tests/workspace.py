"""A git + DVC repository holding a copy of the project, for tests that need git (`dvc exp`,
`git clone` + `dvc pull`): helpers to build one and run tools in it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import yaml

from conftest import REPO

BIN = Path(sys.executable).parent
GIT_USER = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com"}
# Small enough for a test: 5/3/4 images per class, one augmented copy, short training.
SMALL = {"split": {"max_train_per_class": 5, "max_val_per_class": 3, "max_test_per_class": 4},
         "augment": {"copies": 1, "preview_images": 3},
         "train": {"epochs": 3, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}}}


def git_workspace(path: Path, variants: dict | None = None, **overrides: dict) -> Path:
    """``path``: the project's pipeline, code and params (`SMALL`, then ``overrides`` per section;
    ``variants`` replaces the map), committed in a fresh git + DVC repo."""
    path.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "pipeline", "src", "data/local", ".gitignore", ".dvcignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, path / name)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in {**SMALL, **overrides}.items():
        params[section].update(values)
    if variants is not None:
        params["variants"] = variants
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(path, "git", "init", "-q", "-b", "main")
    run(path, "dvc", "init", "-q")
    run(path, "dvc", "config", "core.analytics", "false")
    commit(path, "project")
    return path


def env(path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    out = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(path / "src"),
           "DVC_NO_ANALYTICS": "1", **GIT_USER}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        out.pop(var, None)  # the default store (the repository's mlflow.db) unless ``extra`` names one
    return {**out, **(extra or {})}


def run(path: Path, *cmd: str, check: bool = True, timeout: int = 900,
        extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (the virtualenv's tool of that name when there is one) in ``path``."""
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    done = subprocess.run([exe, *cmd[1:]], cwd=path, env=env(path, extra_env), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def commit(path: Path, message: str) -> None:
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-q", "-m", message)
