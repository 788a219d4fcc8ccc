"""DVC experiments end to end: a queued sweep run by two workers lands in the repository's MLflow
store, each run tagged with its experiment's name, and leaves the registry's alias alone."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from helpers.workspace import commit, git_workspace, run
from project_copy import tool_argv, tool_env

pytestmark = pytest.mark.slow

SWEEP = {"lr-high": 0.02, "lr-low": 0.005}
ONE_VARIANT = {"scratch": {"scratch": {}}, "feature_extract": {}, "fine_tune": {}}


def _wait_for_queue(ws: Path, timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run(ws, "dvc", "queue", "status").stdout
        if not any(word in status for word in ("Queued", "Running")):
            return status
        time.sleep(5)
    run(ws, "dvc", "queue", "kill", *SWEEP, check=False)
    pytest.fail(f"the queue did not finish in {timeout:.0f} s:\n{status}")


def test_a_queued_sweep_on_two_workers_lands_in_the_repositorys_store(tmp_path: Path):
    import mlflow

    ws = git_workspace(tmp_path / "ws", variants=ONE_VARIANT)
    run(ws, "dvc", "repro")
    commit(ws, "baseline")
    baseline = json.loads((ws / "data/registry.json").read_text())
    for name, lr in SWEEP.items():
        run(ws, "dvc", "exp", "run", "--queue", "-n", name, "-S", f"scratch.lr={lr}")
    try:
        # Its output to a file, not a pipe: the workers it starts inherit it, and one that lingers
        # after the queue is empty (a dvc-task shutdown race, seen here under load) would hold a
        # pipe open and hang this call; the queue's own status says when the sweep is done.
        with open(ws / "queue-start.log", "w", encoding="utf-8") as log:
            subprocess.run(tool_argv(["dvc", "queue", "start", "-j", "2"]), cwd=ws, env=tool_env(ws), stdout=log,
                           stderr=subprocess.STDOUT, check=True, timeout=120)
        status = _wait_for_queue(ws)
    finally:
        run(ws, "dvc", "queue", "stop", "--kill", check=False)
    assert status.count("Success") == 2, status + run(ws, "dvc", "queue", "logs", "lr-high", check=False).stdout

    # dvc exp show has both experiments, with their params and metrics.
    shown = json.loads(run(ws, "dvc", "exp", "show", "--json").stdout)
    experiments = {exp["name"]: exp for commit in shown for exp in (commit.get("experiments") or [])}
    assert set(experiments) == set(SWEEP), list(experiments)
    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string="tags.`dvc.exp_name` != ''")
    by_name: dict[str, list] = {}
    for r in runs:
        by_name.setdefault(r.data.tags["dvc.exp_name"], []).append(r)
    assert set(by_name) == set(SWEEP)
    for name, lr in SWEEP.items():
        exp_data = next(iter(experiments[name]["revs"]))["data"]
        assert exp_data["params"]["params.yaml"]["data"]["scratch"]["lr"] == lr
        runs_of = {r.data.tags.get("stage"): r for r in by_name[name]}
        assert {"scratch@scratch", "evaluate"} <= set(runs_of), (name, list(runs_of))
        train = runs_of["scratch@scratch"]
        assert train.info.status == "FINISHED" and train.data.params["lr"] == str(lr)
        # The run's artifacts (its model) are in the repository's mlruns/, not in the deleted copy.
        assert train.info.artifact_uri.startswith(str(ws / "mlruns")), train.info.artifact_uri
        val = exp_data["metrics"]["data/metrics/scratch.json"]["data"]["val_accuracy"]
        assert train.data.metrics["val_accuracy"] == pytest.approx(val)
    assert not list((ws / ".dvc/tmp/exps").rglob("mlflow.db"))

    # register ran in each experiment: new versions tagged with it; the alias did not move.
    versions = client.search_model_versions(f"name='{baseline['model_name']}'")
    tagged = {v.tags.get("dvc.exp_name") for v in versions}
    assert set(SWEEP) <= tagged, tagged
    alias = client.get_model_version_by_alias(baseline["model_name"], "champion")
    assert alias.version == baseline["champion_version"]
    assert "dvc.exp_name" not in alias.tags
