"""The pipeline against the team stack (`cnnlab_stack.stack`: MLflow server with basic auth, PostgreSQL,
artifacts in SeaweedFS through the server's proxy): every stage, the training stages as two
torchrun processes, serving the champion, the predict CLI, clear auth errors, and the bucket as a
DVC remote (push, clone, pull, no-op repro)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from helpers.served import serve_and_predict
from helpers.workspace import commit, git_workspace, run

pytestmark = pytest.mark.slow

VARIANTS = ("scratch", "feature_extract", "fine_tune")
MODEL = "cnnlab-classifier"


def _metrics(ws: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ws / "data/metrics").glob("*.json"))}


def test_the_pipeline_runs_against_the_team_server_and_the_bucket_is_a_dvc_remote(team_stack, tmp_path: Path):
    import boto3
    import mlflow

    client_env = team_stack.client_env()
    defaults = yaml.safe_load((REPO / "params.yaml").read_text())
    # One variant of each kind; the training stages (scratch@*, fine_tune@*) as 2 torchrun processes.
    variants = {"scratch": {"scratch": {}}, "feature_extract": {"feature_extract": {}},
                "fine_tune": {"fine_tune": {"from": "feature_extract"}}, "ensemble": {"ensemble": {}}}
    ws = git_workspace(tmp_path / "ws", variants=variants, fine_tune={"epochs": 1}, distributed={"nproc_per_node": 2},
                       feature_extract={"image_size": 32, "head": {**defaults["feature_extract"]["head"], "epochs": 3}})
    started = time.perf_counter()
    done = run(ws, "dvc", "repro", extra_env=client_env)
    print(f"\ndvc repro against the team server: {time.perf_counter() - started:.0f} s")
    assert not (ws / "mlflow.db").exists() and not (ws / "mlruns").exists()
    assert "scratch@scratch: device cpu" in done.stderr and "2 processes (batch 64 each)" in done.stderr
    assert "fine_tune@fine_tune: device cpu" in done.stderr and "2 processes (batch 32 each)" in done.stderr

    # Every variant's run is on the server, FINISHED, with its model's files in the bucket.
    client = mlflow.MlflowClient(client_env["MLFLOW_TRACKING_URI"])
    with pytest.MonkeyPatch.context() as mp:
        for key, value in client_env.items():
            mp.setenv(key, value)
        s3 = team_stack.s3
        bucket = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                              aws_secret_access_key=s3.secret_key, region_name="us-east-1")
        keys = [o["Key"] for page in bucket.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket,
                                                                                       Prefix="mlflow/")
                for o in page.get("Contents", [])]
        for variant in VARIANTS:
            run_id = json.loads((ws / f"data/models/{variant}/run.json").read_text())["run_id"]
            tracked = client.get_run(run_id)
            assert tracked.info.status == "FINISHED" and tracked.info.run_name == variant
            # Two processes trained it, rank 0 alone logged: one run per variant.
            assert tracked.data.params.get("world_size") == (None if variant == "feature_extract" else "2")
            assert tracked.info.artifact_uri.startswith("mlflow-artifacts:/"), tracked.info.artifact_uri
            assert "test_accuracy" in tracked.data.metrics  # evaluate wrote back to the same run
        experiment = client.get_experiment_by_name("cnnlab")
        # + evaluate's, and the ensemble's (evaluate made it; register logged its pyfunc, all three members, there)
        assert len(client.search_runs([experiment.experiment_id])) == len(VARIANTS) + 2
        ensemble = client.get_run(json.loads((ws / "data/ensembles.json").read_text())["ensemble"]["run_id"])
        assert ensemble.info.status == "FINISHED" and ensemble.data.params["members"] == ",".join(VARIANTS)
        assert client.search_logged_models([experiment.experiment_id],
                                           filter_string=f"source_run_id = '{ensemble.info.run_id}'")
        assert any(k.endswith("MLmodel") for k in keys), keys[:20]
        registry = json.loads((ws / "data/registry.json").read_text())
        champion = client.get_model_version_by_alias(MODEL, "champion")
        assert champion.version == registry["champion_version"]

        # Serving and the predict CLI load the champion through the server: a stored test image as a file.
        from cnnlab.data.shards import iter_images, read_manifest

        row, data = next(zip(read_manifest(ws / "data/split", "test"), iter_images(ws / "data/split", "test")))
        image = tmp_path / f"stored.{row['format']}"
        image.write_bytes(data)
        served = serve_and_predict(f"models:/{MODEL}@champion", ws, [image.read_bytes()], env=client_env)[0]
        predicted = run(ws, "python", "-m", "cnnlab", "predict", str(image), "--json", extra_env=client_env)
        assert json.loads(predicted.stdout)["label"] == served["label"]

    # The bucket as the DVC remote: push, then a teammate's clone pulls and has nothing to run.
    run(ws, "python", "-m", "cnnlab_stack", "dvc-remote", "--dir", str(team_stack.dir))
    assert "secret_access_key" not in (ws / ".dvc/config").read_text()
    commit(ws, "remote")
    started = time.perf_counter()
    pushed = run(ws, "dvc", "push")
    print(f"dvc push: {time.perf_counter() - started:.1f} s ({pushed.stdout.strip().splitlines()[-1]})")
    clone = tmp_path / "clone"
    run(tmp_path, "git", "clone", "-q", str(ws), str(clone))
    run(clone, "python", "-m", "cnnlab_stack", "dvc-remote", "--dir", str(team_stack.dir))
    started = time.perf_counter()
    pulled = run(clone, "dvc", "pull")
    print(f"dvc pull: {time.perf_counter() - started:.1f} s ({pulled.stdout.strip().splitlines()[-1]})")
    status = run(clone, "dvc", "status", check=False)
    again = run(clone, "dvc", "repro", extra_env=client_env)
    assert "Data and pipelines are up to date." in again.stdout, status.stdout[-3000:] + again.stdout[:2000]
    assert "Running stage" not in again.stdout
    assert _metrics(clone) == _metrics(ws)


def test_a_stage_without_rights_or_with_a_wrong_password_stops_with_a_clear_error(team_stack, tmp_path: Path):
    from mlflow.server import get_app_client

    client_env = team_stack.client_env()
    with pytest.MonkeyPatch.context() as mp:
        for key, value in client_env.items():
            mp.setenv(key, value)
        auth = get_app_client("basic-auth", tracking_uri=client_env["MLFLOW_TRACKING_URI"])
        auth.create_user("viewer", "viewer-password-123")
    ws = git_workspace(tmp_path / "ws", variants={"scratch": {"scratch": {}}, "feature_extract": {},
                                                  "fine_tune": {}})
    run(ws, "dvc", "repro", "augment")  # no MLflow yet
    # Runs go to the experiment the admin's run created; the viewer may read it, not write.
    run(ws, "dvc", "repro", "scratch@scratch", extra_env=client_env)
    viewer = {**client_env, "MLFLOW_TRACKING_USERNAME": "viewer", "MLFLOW_TRACKING_PASSWORD": "viewer-password-123"}
    denied = run(ws, "dvc", "repro", "-f", "-s", "scratch@scratch", check=False, extra_env=viewer)
    assert denied.returncode != 0
    assert "denied user 'viewer' (403)" in denied.stderr and "Traceback" not in denied.stderr, denied.stderr[-3000:]
    wrong = {**client_env, "MLFLOW_TRACKING_PASSWORD": "not-the-password"}
    refused = run(ws, "dvc", "repro", "-f", "-s", "scratch@scratch", check=False, extra_env=wrong)
    assert refused.returncode != 0
    assert "did not accept user 'admin' (401)" in refused.stderr and "Traceback" not in refused.stderr, \
        refused.stderr[-3000:]
