"""Runs never stay RUNNING after their process dies: SIGKILL (the watcher) and power cuts (the
sweep at the next start), against a real sqlite store and real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from cnnlab.utils import run_guard
from cnnlab.tracking.runs import tracked_run
from conftest import use_mlflow_store

_STAGE = r"""
import sys, time
from cnnlab.tracking.runs import tracked_run
with tracked_run(experiment="exp", run_name="victim", tags={}, params={"a": 1}) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


def _wait_for_status(client: mlflow.MlflowClient, run_id: str, *, not_status: str, limit_s: float = 120) -> str:
    deadline = time.monotonic() + limit_s  # a bound on waiting, not a speed assertion
    while (status := client.get_run(run_id).info.status) == not_status and time.monotonic() < deadline:
        time.sleep(0.2)
    return status


def _dead_pid_owner() -> str:
    """The owner tag of a process that ran on this machine and is gone."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tag = run_guard.owner(p.pid)
    finally:
        p.kill()
        p.wait()
    return tag


def test_a_sigkilled_stage_s_run_is_ended_killed_by_its_watcher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    uri = use_mlflow_store(monkeypatch, tmp_path)
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    stage = subprocess.Popen([sys.executable, "-c", _STAGE], stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    run_id = stage.stdout.readline().strip()
    client = mlflow.MlflowClient(uri)
    assert client.get_run(run_id).info.status == "RUNNING"
    stage.send_signal(signal.SIGKILL)
    stage.wait()
    assert _wait_for_status(client, run_id, not_status="RUNNING") == "KILLED"
    assert "died" in client.get_run(run_id).data.tags[run_guard.ENDED_TAG]


def test_the_watcher_leaves_a_run_its_owner_ended_or_someone_else_resumed(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch):
    uri = use_mlflow_store(monkeypatch, tmp_path)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("exp")
    told = client.create_run(experiment, tags={run_guard.OWNER_TAG: run_guard.owner()})
    watcher = run_guard.watch(uri, told.info.run_id)
    watcher.done()  # the owner ended it: the watcher must not touch it afterwards
    assert watcher._process.returncode == 0
    assert client.get_run(told.info.run_id).info.status == "RUNNING"

    resumed = client.create_run(experiment, tags={run_guard.OWNER_TAG: run_guard.owner()})
    watcher = run_guard.watch(uri, resumed.info.run_id)
    client.set_tag(resumed.info.run_id, run_guard.OWNER_TAG, "another/process/1/2")
    watcher._process.stdin.close()  # this process "dies" after another one took the run over
    assert watcher._process.wait(timeout=120) == 0
    assert client.get_run(resumed.info.run_id).info.status == "RUNNING"

    mine = client.create_run(experiment, tags={run_guard.OWNER_TAG: run_guard.owner()})
    watcher = run_guard.watch(uri, mine.info.run_id)
    watcher._process.stdin.close()
    assert watcher._process.wait(timeout=120) == 0
    assert client.get_run(mine.info.run_id).info.status == "KILLED"


def test_owner_alive_tells_live_dead_reused_and_foreign_processes_apart():
    me = run_guard.owner()
    assert run_guard.owner_alive(me) is True
    assert run_guard.owner_alive(_dead_pid_owner()) is False
    host, boot, pid, started = me.rsplit("/", 3)
    assert run_guard.owner_alive(f"{host}/{boot}/{pid}/{int(started) + 1}") is False  # a reused pid
    assert run_guard.owner_alive(f"{host}/not-this-boot/{pid}/{started}") is None
    assert run_guard.owner_alive(f"elsewhere-{socket.gethostname()}/{boot}/{pid}/{started}") is None
    assert run_guard.owner_alive("garbage") is None


def test_opening_a_run_ends_the_experiment_s_runs_whose_process_is_gone(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch):
    """A power cut: the stage and its watcher both gone, the run RUNNING in the store."""
    uri = use_mlflow_store(monkeypatch, tmp_path)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("exp")
    other_experiment = client.create_experiment("other")
    host, boot, _, _ = run_guard.owner().rsplit("/", 3)
    runs = {
        "dead": client.create_run(experiment, tags={run_guard.OWNER_TAG: _dead_pid_owner()}),
        "alive": client.create_run(experiment, tags={run_guard.OWNER_TAG: run_guard.owner()}),
        "foreign": client.create_run(experiment, tags={run_guard.OWNER_TAG: f"elsewhere/{boot}/1/1"}),
        "untagged": client.create_run(experiment),
        "dead_elsewhere": client.create_run(other_experiment, tags={run_guard.OWNER_TAG: _dead_pid_owner()}),
    }
    with tracked_run(experiment="exp", run_name="next", tags={}, params={}):
        pass
    status = {name: client.get_run(r.info.run_id).info.status for name, r in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "foreign": "RUNNING", "untagged": "RUNNING",
                      "dead_elsewhere": "RUNNING"}
    assert "gone" in client.get_run(runs["dead"].info.run_id).data.tags[run_guard.ENDED_TAG]


def test_a_resumed_run_that_was_ended_killed_runs_and_finishes_again(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    uri = use_mlflow_store(monkeypatch, tmp_path)
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("exp")
    left = client.create_run(experiment, tags={run_guard.OWNER_TAG: _dead_pid_owner()})
    with tracked_run(experiment="exp", run_name="again", tags={}, params={}, run_id=left.info.run_id) as run:
        assert run.info.run_id == left.info.run_id
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
        assert client.get_run(run.info.run_id).data.tags[run_guard.OWNER_TAG] == run_guard.owner()
    assert client.get_run(left.info.run_id).info.status == "FINISHED"


_WRITER = r"""
import sys, time
from pathlib import Path
from cnnlab.utils.files import staged_dir
from cnnlab.utils.run_guard import watch_files
root = Path(sys.argv[1])
guard = watch_files(root)
with staged_dir(root / "plots" / "out") as tmp:
    (tmp / "half.png").write_bytes(b"x" * 100)
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_sigkilled_stage_s_temp_files_are_removed_by_its_watcher_and_no_one_else_s(tmp_path: Path):
    """After a SIGKILL DVC usually restores the stage from its cache and runs no code: only the
    watcher can remove what the killed write left beside the output."""
    (tmp_path / "plots" / "out").mkdir(parents=True)
    (tmp_path / "plots" / "out" / "old.png").write_bytes(b"old")  # the previous output, intact
    foreign = tmp_path / "plots" / f".out.tmp-{os.getpid()}-abc"  # a live writer's: not to be touched
    foreign.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    ours = [p for p in (tmp_path / "plots").iterdir() if p.name.startswith(f".out.tmp-{writer.pid}-")]
    assert len(ours) == 1 and (ours[0] / "half.png").exists()
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    deadline = time.monotonic() + 120  # a bound on waiting for the watcher, not a speed assertion
    while ours[0].exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not ours[0].exists()
    assert foreign.exists() and (tmp_path / "plots" / "out" / "old.png").read_bytes() == b"old"
