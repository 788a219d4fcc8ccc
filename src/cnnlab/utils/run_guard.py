"""Runs whose process died without ending them: found and ended KILLED, never left RUNNING.

`cnnlab.tracking.tracked_run` ends its run on any exception, Ctrl-C or SIGTERM, but nothing in a
process survives SIGKILL (the OOM killer, ``kill -9``, a killed container) or a power cut. Two
things cover those:

- a watcher (`watch`): a small process, in its own session so a signal to the stage's process
  group misses it, that holds a pipe to the stage. When the pipe closes without the stage saying
  "done", the stage is gone, and the watcher ends the run KILLED. It covers the case where nothing
  runs afterwards, e.g. `dvc repro` restoring the killed stage from DVC's run cache;
- a sweep (`end_stale_runs`) at the start of every run and in `register`: a RUNNING run whose
  owner (tag ``cnnlab.owner``: host, boot id, pid and the process's start time, so a reused pid
  does not look alive) is a process on this machine that no longer exists is ended KILLED. It
  covers a power cut, where the watcher died too. Runs owned by another host are left alone: from
  here nobody can tell whether their process is alive.

The same kind of watcher guards a stage's files (`watch_files`, started for every stage by
pipeline/_common.py): temp files and folders are named with their writer's pid (`temp_prefix`),
and when the stage dies without saying "done", its watcher removes what that pid left under
``data/``. A re-run would not: after a crash DVC usually restores the stage's outputs from its cache
and runs no code at all.

This file runs as a script for the watchers (``python run_guard.py URI RUN_ID OWNER``,
``python run_guard.py --files ROOT PID``) and then imports only the standard library (and mlflow
for a run), so it starts without the cnnlab package.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

_log = logging.getLogger("cnnlab.utils.run_guard")

OWNER_TAG = "cnnlab.owner"
ENDED_TAG = "cnnlab.ended_by"
_DONE = b"done"


def owner(pid: int | None = None) -> str:
    """``host/boot id/pid/start time`` of process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return "/".join((socket.gethostname(), _boot_id(), str(pid), _start_time(pid) or "?"))


def owner_alive(value: str) -> bool | None:
    """Whether the process an owner tag names still runs; None when this machine cannot tell."""
    try:
        host, boot, pid, started = value.rsplit("/", 3)
        pid_number = int(pid)
    except ValueError:
        return None
    if host != socket.gethostname() or not boot or boot != _boot_id() or started == "?":
        return None  # another machine, or a platform without /proc: unknowable from here
    return _start_time(pid_number) == started


def end_stale_runs(client: Any, experiment_ids: list[str]) -> list[str]:
    """End KILLED every RUNNING run of these experiments whose owning process is gone; returns their
    ids. ``client`` is an ``mlflow.MlflowClient`` of the store the runs are in."""
    from mlflow.entities import RunStatus

    ended = []
    runs = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in runs:
        tag = run.data.tags.get(OWNER_TAG)
        if tag and owner_alive(tag) is False:
            client.set_tag(run.info.run_id, ENDED_TAG, f"cnnlab: its process ({tag}) was gone")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            _log.warning("ended run %s (%s) KILLED: the process that ran it is gone", run.info.run_id,
                         run.info.run_name)
            ended.append(run.info.run_id)
    return ended


class Watcher:
    """Handle on a watcher process; `done` tells it the run was ended by its owner."""

    def __init__(self, process: subprocess.Popen | None) -> None:
        self._process = process

    def done(self) -> None:
        if self._process is None or self._process.stdin is None:
            return
        try:
            self._process.stdin.write(_DONE)
            self._process.stdin.close()
        except OSError:  # the watcher died: nothing to tell
            pass
        self._process.wait(timeout=30)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (anyone's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_prefix(name: str) -> str:
    """Prefix of a temp file or folder written in place of ``name``, tagged with this process."""
    return f".{name}.tmp-{os.getpid()}-"


def remove_temp_files_of(pid: int, root: Path, depth: int = 3) -> list[Path]:
    """Remove the temp files and folders (`temp_prefix`, and ``.old-`` ones named after them) that
    process ``pid`` left in ``root`` and its folders down to ``depth`` levels; returns them."""
    mark = re.compile(rf"^\..+\.tmp-{pid}-[^/]*$")
    removed, level = [], [root]
    for _ in range(depth):
        below = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for entry in entries:
                if mark.match(entry.name):
                    path = Path(entry.path)
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
                elif entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
        level = below
    return removed


def watch_files(root: Path) -> Watcher:
    """Start a watcher that removes this process's temp files under ``root`` if it dies before
    calling `done`."""
    return _spawn(["--files", str(root), str(os.getpid())])


def watch(tracking_uri: str, run_id: str) -> Watcher:
    """Start a watcher that ends ``run_id`` KILLED if this process dies before calling `done`."""
    return _spawn([tracking_uri, run_id, owner()])


def _spawn(args: list[str]) -> Watcher:
    try:
        process = subprocess.Popen(
            # -I: not the script's folder (cnnlab/) on sys.path, whose module names could shadow others.
            [sys.executable, "-I", str(Path(__file__)), *args],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, close_fds=True,
        )
    except OSError:  # the sweep at the next start still covers it
        return Watcher(None)
    return Watcher(process)


def _watch_main(tracking_uri: str, run_id: str, run_owner: str) -> int:
    message = sys.stdin.buffer.read()  # returns when the stage closes the pipe, or dies
    if message == _DONE:
        return 0
    if tracking_uri == "--files":
        remove_temp_files_of(int(run_owner), Path(run_id))
        return 0
    import mlflow
    from mlflow.entities import RunStatus

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    # Only the run as this owner left it: a resume by another process re-tags the owner.
    if run.info.status == "RUNNING" and run.data.tags.get(OWNER_TAG) == run_owner:
        client.set_tag(run_id, ENDED_TAG, f"cnnlab watcher: its process ({run_owner}) died")
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))
    return 0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if no
    such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or ")".
    return stat[stat.rindex(")") + 2 :].split()[19]


if __name__ == "__main__":
    sys.exit(_watch_main(*sys.argv[1:4]))
