"""MLflow conventions shared by every stage: where runs go, how params/tags look, run lifecycle.

`tracked_run` is the only way a stage should open a run: it guarantees the run never stays
RUNNING (FINISHED / FAILED / KILLED, including on SIGTERM from DVC or a user), tags it with the
code version and a hash of its params, and can resume a run that a killed job left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus
from mlflow.exceptions import MlflowException

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # MLflow 3's own default; relative to the cwd

# MLflow's limits (mlflow.utils.validation): 100 params per batch, 6000 chars per value.
_PARAMS_PER_BATCH = 100
_MAX_PARAM_CHARS = 6000

_log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM inside `tracked_run`.

    A SystemExit so that, uncaught, the process still exits quietly with the conventional
    128 + SIGTERM status, after every ``finally`` up the stack has run.
    """

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def tracking_uri() -> str:
    """The store every stage writes to; the env var lets CI and tests point elsewhere."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested params -> MLflow's flat string params: {"a": {"b": 1}} -> {"a.b": "1"}."""
    out: dict[str, str] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = _param_value(value)
    return out


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, list, tuple, Mapping)):
        # JSON spelling, so "null"/"true"/"[1, 2]" read the same as in params.yaml dumps.
        return json.dumps(value, default=str, ensure_ascii=False)
    return str(value)


def params_hash(d: Mapping[str, Any]) -> str:
    """Short, key-order-independent fingerprint of a config: equal hash = same params."""
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def files_digest(*paths: Path) -> str:
    """Short fingerprint of the files' contents, in order: equal digest = same data."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def git_commit(cwd: Path | None = None) -> str | None:
    """HEAD of the checkout (``-dirty`` with local changes); None when unknowable. Never raises."""
    # GIT_OPTIONAL_LOCKS=0: `git status` must not take index.lock, which would race with a
    # person running git in the same checkout while a stage runs.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--verify", "HEAD")
        dirty = bool(git("status", "--porcelain"))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return f"{commit}-dirty" if dirty else commit


@contextmanager
def tracked_run(
    *,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or resume ``run_id``) a run that ends FINISHED, FAILED or KILLED, never RUNNING.

    SIGTERM inside the block raises `Terminated`; KeyboardInterrupt and `Terminated` mark the
    run KILLED and propagate, any other exception marks it FAILED and propagates.
    """
    mlflow.set_tracking_uri(tracking_uri())
    flat = {k: _truncate(v) for k, v in flatten(params).items()}
    all_tags = {**tags, "params_hash": params_hash(params)}
    commit = git_commit()
    if commit is not None:  # absent rather than a fake value: "unknown" would look like a commit
        all_tags["git_commit"] = commit

    in_main = threading.current_thread() is threading.main_thread()
    active: mlflow.ActiveRun | None = None
    installed, previous_handler = False, None
    status = RunStatus.FAILED
    try:
        # SIGTERM is held while the run is created and set up, so it cannot strike between
        # "run exists in the store" and "we hold it", which would leave it RUNNING.
        with _sigterm_held(in_main):
            if in_main:
                previous_handler = signal.signal(signal.SIGTERM, _raise_terminated)
                installed = True
            previous = _existing_run(run_id)
            if previous is not None:
                active = mlflow.start_run(run_id=previous.info.run_id)
                logged = previous.data.params
            else:
                experiment_id = mlflow.set_experiment(experiment).experiment_id
                active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
                logged = {}
            mlflow.set_tags(all_tags)
            _log_missing_params(flat, logged)
        yield active
        status = RunStatus.FINISHED
    except (KeyboardInterrupt, Terminated):
        status = RunStatus.KILLED
        raise
    finally:
        # Held again so a second SIGTERM cannot cut end_run short; one that arrives meanwhile
        # goes to the previous handler (by default: exit 143) once released.
        with _sigterm_held(in_main):
            if active is not None:
                mlflow.end_run(RunStatus.to_string(status))
            if installed:  # None: the old handler was set outside Python; default is closest
                signal.signal(signal.SIGTERM, previous_handler or signal.SIG_DFL)


def _existing_run(run_id: str | None) -> Run | None:
    if run_id is None:
        return None
    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except MlflowException:
        _log.warning("run %s not found in %s; starting a new run", run_id, tracking_uri())
        return None
    return run if run.info.lifecycle_stage == "active" else None


def _log_missing_params(flat: Mapping[str, str], logged: Mapping[str, str]) -> None:
    # MLflow refuses to change a logged param, so a resumed run only adds what is new.
    changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != v)
    if changed:
        _log.warning("resumed run keeps its earlier values for changed params: %s", ", ".join(changed))
    missing = [(k, v) for k, v in flat.items() if k not in logged]
    for i in range(0, len(missing), _PARAMS_PER_BATCH):
        mlflow.log_params(dict(missing[i : i + _PARAMS_PER_BATCH]))


def _truncate(value: str) -> str:
    if len(value) <= _MAX_PARAM_CHARS:
        return value
    # The digest keeps two different long values distinguishable after truncation.
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
    marker = f"...[truncated, sha256 {digest}]"
    return value[: _MAX_PARAM_CHARS - len(marker)] + marker


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


@contextmanager
def _sigterm_held(enabled: bool) -> Iterator[None]:
    """Defer SIGTERM for the block (signal masks only matter in the main thread).

    A no-op where Python has no signal masks (Windows): there another process's SIGTERM is
    TerminateProcess, which no handler sees, so there is nothing to defer.
    """
    if not enabled or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
