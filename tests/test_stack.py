"""`python -m cnnlab_stack`, for real: PostgreSQL, SeaweedFS and an MLflow server with basic auth,
started, checked, half-killed, restarted and stopped; what listens where; a run whose artifact
lands in the bucket; S3 and MLflow refusing requests without (the right) credentials; the DVC
remote. Most tests share the session's `team_stack` (conftest); the lifecycle test has its own.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import requests
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from cnnlab_stack.stack import BUCKET, Stack
from conftest import stack_folder

pytestmark = pytest.mark.slow

ANY_PORT = ["--mlflow-port", "0", "--pg-port", "0", "--s3-port", "0"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cnnlab_stack", *args], capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def alive(pid: int) -> bool:
    """Running, not a zombie (a killed server whose parent, here or init, has not reaped it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except OSError:
        return False


def main_pids(folder: Path) -> dict[str, int | None]:
    return {name: s["pid"] for name, s in Stack(folder).status().items()}


def s3_client(stack: Stack, **kwargs: object):
    s3 = stack.s3
    options = {"aws_access_key_id": s3.access_key, "aws_secret_access_key": s3.secret_key} | kwargs
    return boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1", **options)


def test_cli_up_twice_restart_one_piece_down(tmp_path: Path) -> None:
    with stack_folder() as folder:
        try:
            up = cli("up", "--dir", str(folder), *ANY_PORT)
            assert up.returncode == 0, up.stderr
            stack = Stack(folder)
            expected = [f"export {k}={shlex.quote(v)}" for k, v in stack.client_env().items()]
            assert re.findall(r"^export .*$", up.stdout, re.M) == expected
            assert stack.client_env()["MLFLOW_TRACKING_USERNAME"] == "admin"
            assert len(stack.client_env()["MLFLOW_TRACKING_PASSWORD"]) >= 12
            assert stat.S_IMODE((folder / "stack.json").stat().st_mode) == 0o600
            env_cmd = shlex.join([sys.executable, "-m", "cnnlab_stack", "env", "--dir", str(folder)])
            shell = f'eval "$({env_cmd})"; echo "$MLFLOW_TRACKING_URI $MLFLOW_TRACKING_USERNAME"'
            echoed = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, cwd=tmp_path)
            assert echoed.stdout.split() == [stack.client_env()["MLFLOW_TRACKING_URI"], "admin"]
            pids = main_pids(folder)
            assert all(pids.values()), pids

            started = time.monotonic()
            again = cli("up", "--dir", str(folder), *ANY_PORT)
            assert again.returncode == 0, again.stderr
            assert time.monotonic() - started < 15 and "starting" not in again.stderr
            assert main_pids(folder) == pids
            assert Stack(folder).client_env() == stack.client_env()  # same ports and secrets
            assert cli("status", "--dir", str(folder)).returncode == 0

            # Kill MLflow's main process only: its uvicorn workers live on and hold the port.
            old_mlflow = stack.processes()["mlflow"]
            assert len(old_mlflow) >= 3
            os.kill(pids["mlflow"], signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(pids["mlflow"]) and time.monotonic() < deadline:
                time.sleep(0.1)
            status = cli("status", "--dir", str(folder))
            assert status.returncode == 1 and re.search(r"^mlflow\s+stopped", status.stdout, re.M)
            restart = cli("up", "--dir", str(folder), *ANY_PORT)
            assert restart.returncode == 0, restart.stderr
            assert "mlflow: starting" in restart.stderr
            assert "postgres: starting" not in restart.stderr and "seaweedfs: starting" not in restart.stderr
            now = main_pids(folder)
            assert now["postgres"] == pids["postgres"] and now["seaweedfs"] == pids["seaweedfs"]
            assert now["mlflow"] not in (None, pids["mlflow"])
            assert not [p for p in old_mlflow if alive(p)], "the killed server's workers were left running"
            health = requests.get(f"{stack.client_env()['MLFLOW_TRACKING_URI']}/health", timeout=10)
            assert health.status_code == 200

            everything = [p for pids_ in Stack(folder).processes().values() for p in pids_]
            down = cli("down", "--dir", str(folder))
            assert down.returncode == 0, down.stderr
            assert not [p for p in everything if alive(p)]
            for port in Stack(folder).ports.values():
                with socket.socket() as s, pytest.raises(ConnectionRefusedError):
                    s.connect(("127.0.0.1", port))
            assert cli("status", "--dir", str(folder)).returncode == 1
            assert cli("down", "--dir", str(folder)).returncode == 0
        finally:
            Stack(folder).down()


def listening_sockets() -> dict[int, tuple[str, int]]:
    """Socket inode -> (address, port) of every TCP listener, IPv4 and IPv6."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address, port = fields[1].split(":")
            raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
            ip = socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)
            out[int(fields[9])] = (ip, int(port, 16))
    return out


def test_listens_only_on_its_own_loopback_ports(team_stack: Stack) -> None:
    sockets = listening_sockets()
    found: dict[str, set[tuple[str, int]]] = {}
    for piece, pids in team_stack.processes().items():
        assert pids, f"{piece} is not running"
        for pid in pids:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                inode = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(fd) if fd.is_symlink() else "")
                if inode and int(inode[1]) in sockets:
                    found.setdefault(piece, set()).add(sockets[int(inode[1])])
    ports = team_stack.ports
    weed = {port for key, port in ports.items() if key not in ("mlflow", "postgres")}
    assert len(weed) == 10
    assert found == {
        "postgres": {("127.0.0.1", ports["postgres"])},
        "seaweedfs": {("127.0.0.1", port) for port in weed},
        "mlflow": {("127.0.0.1", ports["mlflow"])},
    }


def test_mlflow_run_lands_in_the_bucket(team_stack: Stack, monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    import mlflow

    for key, value in team_stack.client_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.chdir(tmp_path)
    # Set, not only in the environment: a URI an earlier test set in this process would win.
    mlflow.set_tracking_uri(team_stack.client_env()["MLFLOW_TRACKING_URI"])
    try:
        notes = tmp_path / "notes.txt"
        notes.write_text("a small artifact\n")
        experiment = mlflow.MlflowClient().create_experiment(f"stack-test-{secrets.token_hex(4)}")
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_param("lr", 0.01)
            mlflow.log_metric("accuracy", 0.93)
            mlflow.log_artifact(str(notes))
        logged = mlflow.MlflowClient().get_run(run.info.run_id)
        assert logged.data.params == {"lr": "0.01"} and logged.data.metrics == {"accuracy": 0.93}
        assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)] == ["notes.txt"]
    finally:
        mlflow.set_tracking_uri(None)  # back to the environment's, for later tests

    listed = s3_client(team_stack).list_objects_v2(Bucket=BUCKET, Prefix="mlflow/")
    keys = [o["Key"] for o in listed.get("Contents", [])]
    key = next((k for k in keys if k.endswith(f"/{run.info.run_id}/artifacts/notes.txt")), None)
    assert key, keys
    body = s3_client(team_stack).get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert body == b"a small artifact\n"


def test_s3_refuses_requests_without_the_keys(team_stack: Stack) -> None:
    s3_client(team_stack).list_objects_v2(Bucket=BUCKET)  # the control: with the keys it works
    anonymous = s3_client(team_stack, aws_access_key_id=None, aws_secret_access_key=None,
                          config=Config(signature_version=UNSIGNED))
    wrong = s3_client(team_stack, aws_secret_access_key="not-the-secret")
    for client in (anonymous, wrong):
        for call in (lambda: client.list_objects_v2(Bucket=BUCKET),
                     lambda: client.put_object(Bucket=BUCKET, Key="mlflow/intruder.txt", Body=b"x")):
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert requests.get(f"{team_stack.s3.endpoint}/{BUCKET}", timeout=10).status_code == 403
    assert requests.put(f"{team_stack.s3.endpoint}/{BUCKET}/x.txt", data=b"x", timeout=10).status_code == 403


def test_mlflow_refuses_requests_without_credentials(team_stack: Stack) -> None:
    env = team_stack.client_env()
    url = f"{env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search"
    params = {"max_results": 1}
    assert requests.get(url, params=params, timeout=30).status_code == 401
    assert requests.get(url, params=params, auth=("admin", "not-the-password"), timeout=30).status_code == 401
    admin = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    assert requests.get(url, params=params, auth=admin, timeout=30).status_code == 200


def test_user_without_permission_gets_403(team_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    env = team_stack.client_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    uri = env["MLFLOW_TRACKING_URI"]
    auth = get_app_client("basic-auth", tracking_uri=uri)
    user, password = f"alice-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    auth.create_user(username=user, password=password)
    admin = mlflow.MlflowClient(uri)
    hidden = admin.create_experiment(f"admin-only-{secrets.token_hex(4)}")
    shared = admin.create_experiment(f"shared-{secrets.token_hex(4)}")
    # 3.17 takes DENY here: a per-resource NO_PERMISSIONS grant is rejected (permissions.py).
    auth.grant_user_permission(user, "experiment", hidden, "DENY")

    def call(method: str, endpoint: str, **kwargs: object) -> int:
        url = f"{uri}/api/2.0/mlflow/{endpoint}"
        return requests.request(method, url, auth=(user, password), timeout=30, **kwargs).status_code

    assert call("GET", "experiments/get", params={"experiment_id": shared}) == 200  # default READ
    assert call("GET", "experiments/get", params={"experiment_id": hidden}) == 403
    assert call("POST", "runs/create", json={"experiment_id": hidden}) == 403
    assert call("POST", "runs/create", json={"experiment_id": shared}) == 403  # READ cannot write
    auth.grant_user_permission(user, "experiment", shared, "EDIT")
    assert call("POST", "runs/create", json={"experiment_id": shared}) == 200

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    with pytest.raises(MlflowException) as refused:
        mlflow.MlflowClient(uri).create_run(hidden)
    assert refused.value.error_code == "PERMISSION_DENIED"


def test_dvc_remote_pushes_to_the_bucket(team_stack: Stack, tmp_path: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=repo, check=True)
    done = cli("dvc-remote", "--dir", str(team_stack.dir), "--name", "team", cwd=repo)
    assert done.returncode == 0, done.stderr
    config = (repo / ".dvc" / "config").read_text()
    local = (repo / ".dvc" / "config.local").read_text() if (repo / ".dvc" / "config.local").is_file() else ""
    assert "remote = team" in config and "url = s3://cnnlab/dvc" in config
    assert f"endpointurl = {team_stack.s3.endpoint}" in config
    assert team_stack.s3.secret_key not in config and team_stack.s3.access_key not in config
    assert team_stack.s3.secret_key in local and team_stack.s3.access_key in local

    (repo / "data.txt").write_text("tracked by dvc\n")
    subprocess.run([dvc, "add", "-q", "data.txt"], cwd=repo, check=True)
    pushed = subprocess.run([dvc, "push", "-q"], cwd=repo, capture_output=True, text=True)
    assert pushed.returncode == 0, pushed.stderr
    listed = s3_client(team_stack).list_objects_v2(Bucket=BUCKET, Prefix="dvc/")
    bodies = [s3_client(team_stack).get_object(Bucket=BUCKET, Key=o["Key"])["Body"].read()
              for o in listed.get("Contents", [])]
    assert b"tracked by dvc\n" in bodies


def test_dvc_remote_takes_keys_that_look_like_options(tmp_path: Path) -> None:
    """A generated key may start with "-" (found by bench/team_stack.py: dvc read
    `-Z6w...` as an unknown option); it must still land in config.local as it is."""
    import json

    folder = tmp_path / "stack"
    folder.mkdir()
    (folder / "stack.json").write_text(json.dumps({
        "ports": {"mlflow": 5000, "postgres": 15432, "s3": 8333},
        "secrets": {"s3_access_key": "-CNNLABKEY", "s3_secret_key": "-Z6wPyoO6Jap-secret"}}))
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    Stack(folder).configure_dvc_remote(repo=repo)
    local = (repo / ".dvc" / "config.local").read_text()
    assert "access_key_id = -CNNLABKEY" in local and "secret_access_key = -Z6wPyoO6Jap-secret" in local
