"""A small copy of this project in a folder of its own, for the benchmarks and slow tests that run
its real pipeline (`dvc repro`, `dvc exp`, `mlflow run`) where they cannot touch the checkout.

    params = project_params(split={"max_train_per_class": 5})   # params.yaml, sections updated
    ws = copy_project(tmp / "ws", params)                       # files + git + DVC, committed
    subprocess.run(tool_argv(["dvc", "repro"]), cwd=ws, env=tool_env(ws))
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What `dvc repro` reads of the project; data/local holds the embedded default images.
PROJECT = ("dvc.yaml", "params.yaml", "pipeline", "src", "data/local", ".gitignore", ".dvcignore")
GIT_USER = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@example.com"}


def project_params(**sections: Mapping) -> dict:
    """The checkout's params.yaml with each named section's keys replaced by ``sections``' (a
    shallow update: a nested mapping given here replaces the whole value)."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    return params


def copy_project(dest: Path, params: Mapping, *, names: Iterable[str] = PROJECT, git: bool = True) -> Path:
    """Create ``dest`` with the checkout's ``names`` (no bytecode caches) and ``params`` as its
    params.yaml; then ``git``: a git + DVC repository with all of it committed (what `dvc exp` and
    `git clone` need), or else DVC without git. Returns ``dest``."""
    dest.mkdir(parents=True)
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    # The checkout's cache settings (links, docs/data.md), as a clone of it would have them.
    cache_type = ["dvc", "config", "cache.type", _cache_type()]
    steps = ([["git", "init", "-q", "-b", "main"], ["dvc", "init", "-q"], ["dvc", "config", "core.analytics", "false"],
              cache_type, ["git", "add", "-A"], ["git", "commit", "-q", "-m", "project"]] if git
             else [["dvc", "init", "--no-scm", "-q"], cache_type])
    for cmd in steps:
        done = subprocess.run(tool_argv(cmd), cwd=dest, env=tool_env(dest), capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} in {dest}: {done.stdout}{done.stderr}")
    return dest


def _cache_type() -> str:
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    return config.get("cache", "type", fallback="copy").strip('"')


def tool_env(ws: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the project's tools run with in the copy ``ws``: the virtualenv first on
    PATH, the copy's own src/ importable, DVC analytics off, a git identity, bytecode caching on
    (each stage process imports torch and MLflow), and none of the caller's MLFLOW_TRACKING_*
    (so the copy's default store, ``ws``/mlflow.db, is used) unless ``extra`` sets them."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ws / "src"),
           "DVC_NO_ANALYTICS": "1", "PYTHONDONTWRITEBYTECODE": "", **GIT_USER}
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(var, None)
    return {**env, **(extra or {})}


def tool_argv(cmd: Iterable[object]) -> list[str]:
    """``cmd`` with its program replaced by the virtualenv's of that name, when there is one."""
    first, *rest = [str(c) for c in cmd]
    exe = BIN / first
    return [str(exe) if exe.exists() else first, *rest]
