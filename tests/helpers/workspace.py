"""A git + DVC repository holding a small copy of the project (bench/project_copy.py), for tests
that need git (`dvc exp`, `git clone` + `dvc pull`): helpers to build one and run tools in it."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from project_copy import BIN, copy_project, project_params, tool_argv, tool_env

__all__ = ["BIN", "SMALL", "commit", "git_workspace", "run"]

# Small enough for a test: 5/3/4 images per class, one augmented copy, short training.
SMALL = {"split": {"max_train_per_class": 5, "max_val_per_class": 6, "max_test_per_class": 4},
         "augment": {"copies": 1, "preview_images": 3},
         "scratch": {"epochs": 3, "lr": 0.01, "arch": "tinyvgg", "arch_kwargs": {"hidden_units": 4}}}


def git_workspace(path: Path, variants: dict | None = None, **overrides: dict) -> Path:
    """``path``: the project's pipeline, code and params (`SMALL`, then ``overrides`` per section;
    ``variants`` replaces the map), committed in a fresh git + DVC repo."""
    params = project_params(**{**SMALL, **overrides})
    if variants is not None:
        params["variants"] = variants
    return copy_project(path, params)


def run(path: Path, *cmd: str, check: bool = True, timeout: int = 900,
        extra_env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (the virtualenv's tool of that name when there is one) in ``path``."""
    done = subprocess.run(tool_argv(cmd), cwd=path, env=tool_env(path, extra_env), capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert done.returncode == 0, f"{cmd}: {done.stdout[-3000:]}{done.stderr[-3000:]}"
    return done


def commit(path: Path, message: str) -> None:
    run(path, "git", "add", "-A")
    run(path, "git", "commit", "-q", "-m", message)
