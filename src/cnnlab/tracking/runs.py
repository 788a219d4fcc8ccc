"""MLflow conventions shared by every stage: where runs go, how params/tags look, run lifecycle.

`tracked_run` is the only way a stage should open a run: it guarantees the run never stays
RUNNING (FINISHED / FAILED / KILLED, including on SIGTERM from DVC or a user, and on SIGKILL via
`cnnlab.utils.run_guard`), tags it with the code version and a hash of its params, and can resume a
run that a killed job left behind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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

from cnnlab.utils import run_guard

DEFAULT_STORE = "mlflow.db"  # MLflow 3's own default store, but at the project root, not the cwd
DEFAULT_ARTIFACTS = "mlruns"

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
    """The store every stage writes to: ``MLFLOW_TRACKING_URI`` (a team server, CI, tests), else
    `default_tracking_uri`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def default_tracking_uri() -> str:
    """``sqlite:///<project root>/mlflow.db``, an absolute path whatever the working directory."""
    return f"sqlite:///{project_root() / DEFAULT_STORE}"


def project_root() -> Path:
    """The repository a run belongs to: ``DVC_ROOT``, else the nearest folder up from the cwd that
    holds ``.dvc/``, else the cwd.

    DVC sets ``DVC_ROOT`` for every stage command, and for an experiment run in a temporary copy
    (`dvc exp run --queue` / ``--temp``, under ``.dvc/tmp/exps/``) sets it to the repository the
    experiment was queued from. A store relative to the cwd would be a new, empty one inside that
    copy, deleted with it, and `register` would find none of the experiment's runs.
    """
    if root := os.environ.get("DVC_ROOT"):
        return Path(root).resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".dvc").is_dir()), cwd)


def default_artifact_location(experiment: str) -> str | None:
    """Where a new experiment of the default store keeps its artifacts: ``<project root>/mlruns/
    <experiment>``; None for a store named by ``MLFLOW_TRACKING_URI`` (its own defaults apply).

    MLflow's own default, ``./mlruns``, is resolved against the cwd of the process that creates the
    experiment: a queued DVC experiment's temporary copy, if that creates it first.
    """
    # Compared, not "is the variable set": mlflow.set_tracking_uri sets it for subprocesses.
    if tracking_uri() != default_tracking_uri():
        return None
    return str(project_root() / DEFAULT_ARTIFACTS / re.sub(r"[^A-Za-z0-9._-]", "_", experiment))


def dvc_experiment_tags() -> dict[str, str]:
    """Tags that match a run with its DVC experiment (`dvc exp show` lists the same name), when
    the run is part of one: DVC sets these variables for `dvc exp run`, not for `dvc repro`."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}
    return {tag: os.environ[var] for var, tag in names.items() if os.environ.get(var)}


def _experiment_id(name: str) -> str:
    location = default_artifact_location(name)
    if location is not None and mlflow.get_experiment_by_name(name) is None:
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except MlflowException as e:  # two queued experiments' stages can race to create it
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    return mlflow.set_experiment(name).experiment_id


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
    params: Mapping[str, Any] | None,
    run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open (or resume ``run_id``) a run that ends FINISHED, FAILED or KILLED, never RUNNING.

    ``params=None`` reopens a finished run to add to it (`register` logs the served model into
    each variant's run): its params, params hash and commit stay those of its training.

    SIGTERM inside the block raises `Terminated`; KeyboardInterrupt and `Terminated` mark the
    run KILLED and propagate, any other exception marks it FAILED and propagates. SIGKILL and power
    cuts are `cnnlab.utils.run_guard`'s: a watcher process ends this run KILLED if the process dies
    inside the block, and opening a run first ends the experiment's runs whose process is gone.
    """
    mlflow.set_tracking_uri(tracking_uri())
    os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run` points it at its own run; a stage opens its own
    flat = {k: _truncate(v) for k, v in flatten(params or {}).items()}
    all_tags = _run_tags(tags, params)

    in_main = threading.current_thread() is threading.main_thread()
    active: mlflow.ActiveRun | None = None
    watcher: run_guard.Watcher | None = None
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
            experiment_id = previous.info.experiment_id if previous is not None else _experiment_id(experiment)
            end_stale_runs([experiment_id])
            if previous is not None:
                active = mlflow.start_run(run_id=previous.info.run_id)
                logged = previous.data.params
            else:
                active = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
                logged = {}
            mlflow.set_tags(all_tags)  # the owner tag first: the watcher ends only a run it owns
            watcher = run_guard.watch(tracking_uri(), active.info.run_id)
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
            if watcher is not None:
                watcher.done()
            if installed:  # None: the old handler was set outside Python; default is closest
                signal.signal(signal.SIGTERM, previous_handler or signal.SIG_DFL)


def _run_tags(tags: Mapping[str, str], params: Mapping[str, Any] | None) -> dict[str, str]:
    """The run's tags: ``tags``, the owner (for the run guard), and for a run of ``params`` the DVC
    experiment, the params hash and the git commit."""
    out = {**tags, run_guard.OWNER_TAG: run_guard.owner()}
    if params is not None:
        out.update({**dvc_experiment_tags(), "params_hash": params_hash(params)})
        commit = git_commit()
        if commit is not None:  # absent rather than a fake value: "unknown" would look like a commit
            out["git_commit"] = commit
    return out


def end_stale_runs(experiment_ids: list[str]) -> list[str]:
    """End KILLED the RUNNING runs of these experiments whose process is gone (`cnnlab.utils.run_guard`).
    Never raises: a store that refuses (no EDIT permission on a team server) only gets a warning."""
    try:
        return run_guard.end_stale_runs(mlflow.MlflowClient(), experiment_ids)
    except MlflowException as exc:
        _log.warning("could not check for runs left RUNNING by a killed process: %s", exc.message)
        return []


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
