"""tracked_run against a real sqlite MLflow store: params, tags, and every way a run can end."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from cnnlab.tracking.runs import (
    Terminated,
    flatten,
    git_commit,
    params_hash,
    default_artifact_location,
    dvc_experiment_tags,
    project_root,
    tracked_run,
    tracking_uri,
)

REPO = Path(__file__).resolve().parents[1]
PARAMS = {"scratch": {"lr": 0.01, "epochs": 3, "layers": [32, 64]}, "seed": 7, "note": None}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One database per module: creating MLflow's tables costs about a second each time.
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # Created up front with its own artifact root: MLflow's default, ./mlruns, is cwd-relative
    # and some tests run from the checkout.
    MlflowClient(tracking_uri=uri).create_experiment("exp", artifact_location=str(root / "artifacts"))
    return uri


@pytest.fixture
def client(store: str, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    return MlflowClient(tracking_uri=store)


def test_tracking_uri_env_wins_else_the_project_roots_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MLFLOW_TRACKING_URI", "DVC_ROOT"):
        monkeypatch.delenv(var, raising=False)
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    (repo / "pipeline" / "deep").mkdir(parents=True)
    # Anywhere inside a DVC repo: its root, as an absolute path.
    monkeypatch.chdir(repo / "pipeline" / "deep")
    assert project_root() == repo.resolve()
    assert tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    assert default_artifact_location("cnnlab") == str(repo.resolve() / "mlruns" / "cnnlab")
    assert default_artifact_location("my exp/1") == str(repo.resolve() / "mlruns" / "my_exp_1")
    # Outside any repo: the cwd, as MLflow itself would.
    monkeypatch.chdir(tmp_path)
    assert tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    # A queued DVC experiment runs in a copy (with its own .dvc/) and DVC_ROOT names the origin.
    copy = repo / ".dvc" / "tmp" / "exps" / "tmp123"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    assert tracking_uri() == f"sqlite:///{repo.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/x.db")
    assert tracking_uri() == "sqlite:////elsewhere/x.db"
    assert default_artifact_location("cnnlab") is None  # that store's own defaults apply


def test_runs_of_a_queued_experiment_land_in_the_origin_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's store and its artifacts are the origin's, whatever the cwd, and it carries the
    DVC experiment's name."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc"
    (copy / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(copy)
    monkeypatch.setenv("DVC_ROOT", str(repo))
    monkeypatch.setenv("DVC_EXP_NAME", "gusty-kite")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    assert dvc_experiment_tags() == {"dvc.exp_name": "gusty-kite", "dvc.exp_baseline_rev": "a" * 40}
    (copy / "note.txt").write_text("hi")
    with tracked_run(experiment="queued", run_name="r", tags={}, params={"seed": 1}) as run:
        mlflow.log_artifact(str(copy / "note.txt"))
    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    got = client.get_run(run.info.run_id)
    assert got.data.tags["dvc.exp_name"] == "gusty-kite"
    assert got.info.artifact_uri.startswith(str(repo / "mlruns" / "queued"))
    assert (repo / "mlruns" / "queued" / run.info.run_id / "artifacts" / "note.txt").read_text() == "hi"
    assert not (copy / "mlflow.db").exists() and not (copy / "mlruns").exists()


def test_flatten_nested_lists_and_none() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": "x"}}, "l": [1, 2], "n": None, "t": True, "e": {}}) == {
        "a.b": "1",
        "a.c.d": "x",
        "l": "[1, 2]",
        "n": "null",
        "t": "true",
        "e": "{}",
    }


def test_params_hash_ignores_key_order_but_not_values() -> None:
    reordered = {"seed": 7, "note": None, "scratch": {"layers": [32, 64], "epochs": 3, "lr": 0.01}}
    assert params_hash(PARAMS) == params_hash(reordered)
    assert re.fullmatch(r"[0-9a-f]{12}", params_hash(PARAMS))
    assert params_hash(PARAMS) != params_hash({**PARAMS, "seed": 8})


def test_git_commit_inside_and_outside_a_checkout(tmp_path: Path) -> None:
    assert git_commit(tmp_path) is None
    assert git_commit(tmp_path / "missing") is None  # bad cwd must not raise either
    if not (REPO / ".git").exists():
        pytest.skip("not running from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_commit(REPO) or "")


def test_finished_run_has_flat_params_and_tags(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    with tracked_run(experiment="exp", run_name="ok", tags={"stage": "train"}, params=PARAMS) as run:
        mlflow.log_metric("loss", 0.5)
    got = client.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "ok"
    assert client.get_experiment(got.info.experiment_id).name == "exp"
    assert got.data.params == flatten(PARAMS)
    assert got.data.tags["stage"] == "train"
    assert got.data.tags["params_hash"] == params_hash(PARAMS)
    commit = git_commit(REPO)
    if commit is None:
        assert "git_commit" not in got.data.tags
    else:  # others may edit the checkout meanwhile, so only the commit part is stable
        assert got.data.tags["git_commit"].split("-")[0] == commit.split("-")[0]


def test_git_commit_tag_absent_outside_a_checkout(
    client: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with tracked_run(experiment="exp", run_name="nogit", tags={}, params={}) as run:
        pass
    assert "git_commit" not in client.get_run(run.info.run_id).data.tags


def test_many_and_long_params_fit_mlflow_limits(
    client: MlflowClient, caplog: pytest.LogCaptureFixture
) -> None:
    params = {"grid": {f"p{i:03d}": i for i in range(250)}, "long": "x" * 10_000}
    with tracked_run(experiment="exp", run_name="big", tags={}, params=params) as run:
        mlflow.log_metric("loss", 1.0, step=0)
    run_id = run.info.run_id
    logged = client.get_run(run_id).data.params
    assert len(logged) == 251 and logged["grid.p249"] == "249"
    assert len(logged["long"]) <= 6000
    assert logged["long"].startswith("xxx") and "truncated" in logged["long"]

    # Resuming with the same long value must not count as a changed param (the comparison is
    # against the truncated value MLflow holds); new params are added, the old ones kept.
    more = {**params, "resumed_from": "ckpt-1"}
    with caplog.at_level(logging.WARNING, logger="cnnlab.tracking.runs"):
        with tracked_run(experiment="exp", run_name="big", tags={}, params=more, run_id=run_id) as again:
            mlflow.log_metric("loss", 0.5, step=1)
    assert again.info.run_id == run_id
    assert not [r for r in caplog.records if r.name == "cnnlab.tracking.runs"], caplog.text
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {**logged, "resumed_from": "ckpt-1"}
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(0, 1.0), (1, 0.5)]
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    assert len(client.search_runs([experiment_id], "attributes.run_name = 'big'")) == 1  # no second run


def test_exception_marks_failed_and_propagates(client: MlflowClient) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(experiment="exp", run_name="bad", tags={}, params={"a": 1}) as run:
            raise RuntimeError("boom")
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert mlflow.active_run() is None


@pytest.mark.parametrize("interrupt", ["keyboard", "sigterm"])
def test_interrupts_mark_killed_and_restore_handler(client: MlflowClient, interrupt: str) -> None:
    before = signal.getsignal(signal.SIGTERM)
    expected = KeyboardInterrupt if interrupt == "keyboard" else Terminated
    with pytest.raises(expected):
        with tracked_run(experiment="exp", run_name=interrupt, tags={}, params={}) as run:
            if interrupt == "keyboard":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at the next bytecode; never sleeps this long
    assert client.get_run(run.info.run_id).info.status == "KILLED"
    assert mlflow.active_run() is None
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_kills_a_real_process_and_its_run(
    client: MlflowClient, store: str, tmp_path: Path
) -> None:
    id_file = tmp_path / "run_id"
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from cnnlab.tracking.runs import tracked_run\n"
        "with tracked_run(experiment='exp', run_name='victim', tags={}, params={'a': 1}) as run:\n"
        "    Path(sys.argv[1]).write_text(run.info.run_id)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(id_file)],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": store},
    )
    try:
        deadline = time.monotonic() + 45
        while not id_file.exists() or not id_file.read_text():
            assert proc.poll() is None, "subprocess died before starting its run"
            assert time.monotonic() < deadline, "subprocess never started its run"
            time.sleep(0.1)
        run_id = id_file.read_text()
        assert client.get_run(run_id).info.status == "RUNNING"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while (status := client.get_run(run_id).info.status) == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == "KILLED"


def test_resume_continues_a_failed_run(client: MlflowClient) -> None:
    with pytest.raises(RuntimeError):
        with tracked_run(experiment="exp", run_name="resume", tags={"try": "1"}, params=PARAMS) as first:
            mlflow.log_metric("loss", 1.0, step=0)
            raise RuntimeError("killed mid-epoch")
    run_id = first.info.run_id
    assert client.get_run(run_id).info.status == "FAILED"

    more = {**PARAMS, "resumed_from": "ckpt-1", "seed": 99}  # seed changed: must not raise
    resumed = tracked_run(experiment="exp", run_name="x", tags={"try": "2"}, params=more, run_id=run_id)
    with resumed as again:
        mlflow.log_metric("loss", 0.5, step=1)
    assert again.info.run_id == run_id
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(run_id, "loss")] == [1.0, 0.5]
    assert got.data.params["resumed_from"] == "ckpt-1"
    assert got.data.params["seed"] == "7"  # MLflow keeps the first value of a param
    assert got.data.tags["try"] == "2"


def test_resume_of_unknown_run_starts_a_new_one(client: MlflowClient) -> None:
    missing = "0" * 32
    with tracked_run(experiment="exp", run_name="fresh", tags={}, params={}, run_id=missing) as run:
        pass
    assert run.info.run_id != missing
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_run_works_without_signal_masks(client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    # Windows' signal module has no pthread_sigmask.
    monkeypatch.delattr(signal, "pthread_sigmask")
    before = signal.getsignal(signal.SIGTERM)
    with tracked_run(experiment="exp", run_name="no-masks", tags={}, params={"a": 1}) as run:
        mlflow.log_metric("loss", 0.5)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"
    assert signal.getsignal(signal.SIGTERM) is before
