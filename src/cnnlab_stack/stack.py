"""``python -m cnnlab_stack up|down|status|env|dvc-remote``: the team's tracking stack, one command.

What runs where, all on 127.0.0.1 only, with its state under DIR (``<repo root>/.stack`` unless
``--dir``; the repo root is the nearest parent of the cwd that holds dvc.yaml):

* **PostgreSQL** (``DIR/postgres``, port 15432): databases ``mlflow`` (runs, models) and
  ``mlflow_auth`` (users, permissions) of the role ``cnnlab``, generated password, scram-sha-256
  (no trust). initdb refuses root, so as root it runs as the ``postgres`` OS user, which must be
  able to traverse DIR and each of its parents.
* **SeaweedFS** ``weed mini`` (``DIR/seaweedfs``; S3 on 8333, its master, volume, filer and admin
  servers and their gRPC ports on 8334-8341 and 18341, each set by flag): the bucket ``cnnlab``,
  ``mlflow/`` for MLflow's artifacts, ``dvc/`` for the DVC remote. S3 takes only the generated
  key pair; telemetry, WebDAV, Iceberg, Lance, metrics and the admin UI are off. The master,
  volume and filer ports have no authentication of their own: loopback is their only fence.
* **MLflow tracking server** (port 5000, ``--app-name basic-auth``, 2 uvicorn workers, job
  execution off): the only piece clients talk to. It proxies artifacts to S3, so clients need no
  S3 keys; the database and S3 secrets are in its environment and ``DIR/mlflow/auth.ini`` (0600).

What each side needs: a tracking client the three variables ``stack env`` prints
(MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD: the admin; make team users with the auth API); DVC
the S3 endpoint and keys, which ``stack dvc-remote`` writes (the keys only to
``.dvc/config.local``, never into git). ``DIR/stack.json`` (0600) holds the ports, the generated
secrets and the pids; ports and secrets survive ``down``/``up``, so clients' variables stay
valid. Logs: ``DIR/logs/{postgres,seaweedfs,mlflow}.log``.

`Stack` is the Python API (the tests start one on free ports); `cnnlab.cli.main` wraps it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

HOST = "127.0.0.1"
BUCKET = "cnnlab"
DB_USER = "cnnlab"
ADMIN_USER = "admin"
MLFLOW_WORKERS = 2
DEFAULT_PORTS = {"mlflow": 5000, "postgres": 15432, "s3": 8333}
PORT_OPTIONS = {"mlflow": "--mlflow-port", "postgres": "--pg-port", "s3": "--s3-port"}
# Every TCP port `weed mini` opens, by its flag. The ones after s3 default to the S3 port + 1, + 2,
# ... except admin_grpc: weed's maintenance worker dials the admin server at its HTTP port + 10000
# whatever -admin.port.grpc says, so that is where the admin server must listen.
WEED_PORTS = {
    "s3": "s3.port", "s3_grpc": "s3.port.grpc", "master": "master.port",
    "master_grpc": "master.port.grpc", "volume": "volume.port", "volume_grpc": "volume.port.grpc",
    "filer": "filer.port", "filer_grpc": "filer.port.grpc", "admin": "admin.port",
    "admin_grpc": "admin.port.grpc",
}
GRPC_OFFSET = 10000
SECRETS = ("postgres_password", "s3_access_key", "s3_secret_key", "mlflow_admin_password", "flask_secret_key")
START_TIMEOUT_S = {"postgres": 60, "seaweedfs": 60, "mlflow": 180}
STOP_TIMEOUT_S = 30  # weed mini's filer alone takes ~11 s to stop gracefully
UP = "`python -m cnnlab_stack up`"


class StackError(Exception):
    """A problem the user fixes (binaries, a port, a piece that will not start): one message, exit 1."""


@dataclass(frozen=True)
class S3Info:
    """How to reach the stack's bucket: what DVC and tests need (tracking clients do not)."""

    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = BUCKET


def default_dir(cwd: Path | None = None) -> Path:
    """``<repo root>/.stack``: the nearest parent of ``cwd`` holding dvc.yaml, else ``cwd``."""
    cwd = (cwd or Path.cwd()).absolute()
    return next((p for p in (cwd, *cwd.parents) if (p / "dvc.yaml").is_file()), cwd) / ".stack"


def find_postgres() -> Path:
    """The folder of initdb, pg_ctl and postgres: ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/*/bin, else PATH; `StackError` saying how to install them."""
    candidates = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10)
        candidates.append(Path(out.stdout.strip()))
    version = lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)]  # noqa: E731
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise StackError("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: run `make "
                     "stack-deps` (installs the apt package postgresql when run as root) or put their "
                     "folder on PATH")


# --- ports ----------------------------------------------------------------------------------


def port_free(port: int) -> bool:
    """Whether ``port`` can be listened on: nothing holds it on 0.0.0.0 or 127.0.0.1."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT does not count
        try:
            s.bind(("", port))
        except (OSError, OverflowError):
            return False
    return True


def choose_ports(saved: Mapping[str, int], requested: Mapping[str, int | None]) -> dict[str, int]:
    """Every port of the stack. ``requested`` (mlflow, postgres, s3): a number, 0 for any free
    port or None for the default when free; either of the last two keeps a saved port."""
    ports: dict[str, int] = {}
    for name, default in DEFAULT_PORTS.items():
        want = requested.get(name)
        if not want and name in saved:
            ports[name] = saved[name]
        else:
            ports[name] = default if want is None and port_free(default) else want or 0
    for offset, key in enumerate(list(WEED_PORTS)[1:-1], 1):  # admin_grpc is derived
        near = ports["s3"] + offset if ports["s3"] else 0
        if ports["s3"] == saved.get("s3") and key in saved:
            ports[key] = saved[key]
        elif near and near not in ports.values() and port_free(near) and _twin_free(key, near, ports):
            ports[key] = near
        else:
            ports[key] = 0
    for key in [key for key, port in ports.items() if not port]:  # admin last: its twin is checked
        ports[key] = _free_port(key, ports)
    return ports | {"admin_grpc": ports["admin"] + GRPC_OFFSET}


def _twin_free(key: str, port: int, taken: Mapping[str, int]) -> bool:
    twin = port + GRPC_OFFSET  # the admin port's gRPC twin
    return key != "admin" or (twin < 65536 and twin not in taken.values() and port_free(twin))


def _free_port(key: str, taken: Mapping[str, int]) -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))  # the kernel's pick: free now
            port = s.getsockname()[1]
        if port not in taken.values() and _twin_free(key, port, taken):
            return port


# --- processes, from /proc --------------------------------------------------------------------

_CHILDREN: list[subprocess.Popen[bytes]] = []  # referenced: no "still running" warnings in-process


class _Proc(NamedTuple):
    pid: int
    comm: str
    ppid: int
    pgrp: int
    start: int  # clock ticks after boot: with the pid, names one process for good


def _proc(pid: int) -> _Proc | None:
    """A live, non-zombie process, from /proc/PID/stat. (Not /proc/PID/cmdline: reading that
    now and then gives nothing while the process maps memory, e.g. during imports.)"""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    head, fields = text.rsplit(")", 1)[0], text.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return _Proc(pid, head.split("(", 1)[1], int(fields[1]), int(fields[2]), int(fields[19]))


def _processes() -> list[_Proc]:
    return [p for d in Path("/proc").glob("[0-9]*") if (p := _proc(int(d.name)))]


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (PostgreSQL's backends, MLflow's workers...)."""
    procs = _processes()
    tree = [pid] if any(p.pid == pid for p in procs) else []
    for parent in tree:  # grows while iterating: breadth-first
        tree += [p.pid for p in procs if p.ppid == parent]
    return tree


def _terminate_group(pgid: int) -> None:
    """SIGTERM the process group, wait up to STOP_TIMEOUT_S, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (left := [p for p in _processes() if p.pgrp == pgid]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            return


def _spawn(cmd: list[str], log: Path, env: Mapping[str, str], cwd: Path) -> int:
    """Start ``cmd`` detached (its own session: it outlives us), output appended to ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        _CHILDREN.append(proc := subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=fd,
                                                  env=env, cwd=cwd, start_new_session=True))
    finally:
        os.close(fd)
    return proc.pid


def _server_env(**extra: str) -> dict[str, str]:
    """Our environment without MLflow/AWS client settings (a stale key, a tracking URI pointing at
    the server itself), plus ``extra``."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))} | extra


def _tool(name: str) -> str:
    """``name`` next to this Python (the virtualenv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if found := str(here) if here.is_file() else shutil.which(name):
        return found
    raise StackError(f"`{name}` not found next to {sys.executable} or on PATH: run `make setup`")


def _last_error(log: Path) -> str:
    with contextlib.suppress(OSError):
        lines = log.read_text(errors="replace").splitlines()[-60:]
        if errors := [line.strip() for line in lines if re.search(r"FATAL|ERROR|Error|error", line)]:
            return f"; its last error: {errors[-1][:300]}"
    return ""


def _private_file(path: Path, text: str, owner: int = -1) -> None:
    path.touch(mode=0o600)  # before the secret goes in, whatever the umask
    os.chown(path, owner, -1)
    path.write_text(text)


# --- the three pieces -------------------------------------------------------------------------


class _Piece:
    """One server of the stack: how to start it, whether it is up, how to stop it."""

    name = ""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.log = stack.dir / "logs" / f"{self.name}.log"

    @property
    def port(self) -> int | None:
        return self.stack.ports.get(self.port_keys()[0])

    def port_keys(self) -> list[str]:
        return [self.name]

    def pid(self) -> int | None:
        """Its main process if it is still the one we started (same pid and start time)."""
        pid = self.stack.state["pids"].get(self.name)
        proc = _proc(pid) if pid else None
        return pid if proc and proc.start == self.stack.state["started"].get(self.name) else None

    def record(self, pid: int | None) -> None:
        if proc := _proc(pid) if pid else None:
            self.stack.state["pids"][self.name], self.stack.state["started"][self.name] = pid, proc.start

    def healthy(self) -> bool:
        raise NotImplementedError

    def answering(self) -> bool:
        """Up enough for `provision`; by default the same as healthy."""
        return self.healthy()

    def provision(self) -> None:
        """What it needs once it answers (databases, the bucket); idempotent."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop its process group, with what a killed main process left behind. (A group id is
        not reused while the group has members; a live leader must be the one we started.)"""
        pgid = self.stack.state["pids"].pop(self.name, None)
        start = self.stack.state["started"].pop(self.name, None)
        if pgid and ((leader := _proc(pgid)) is None or leader.start == start):
            _terminate_group(pgid)

    def check_ports(self) -> None:
        for key in self.port_keys():
            if not port_free(port := self.stack.ports[key]):
                what = self.name if key == self.name else f"{self.name} {key}"
                raise StackError(f"port {port} ({what}) is in use by another program: stop it, or choose "
                                 f"other ports with {UP[:-1]} {PORT_OPTIONS.get(key, '--s3-port')} PORT` "
                                 "(0 = any free port)")

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S[self.name]
        while not self.answering():
            if self.pid() is None:
                raise self.failed("exited while starting")
            if time.monotonic() > deadline:
                raise self.failed(f"did not answer within {START_TIMEOUT_S[self.name]} s")
            time.sleep(0.5)
        self.provision()

    def failed(self, what: str) -> StackError:
        return StackError(f"{self.name} {what} (port {self.port}){_last_error(self.log)}: read {self.log}, "
                          f"fix what it reports, then run {UP} again")


class _Postgres(_Piece):
    name = "postgres"

    @property
    def data(self) -> Path:
        return self.stack.dir / "postgres"

    def pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            return pid if (proc := _proc(pid)) and proc.comm == "postgres" else None
        return None

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg2  # here: `--help` and `env` need not wait for it

        conn = psycopg2.connect(host=HOST, port=self.port, user=DB_USER, dbname=dbname, connect_timeout=3,
                                password=self.stack.secrets["postgres_password"])
        conn.autocommit = True
        return conn

    def healthy(self) -> bool:
        try:
            self.connect().close()
        except Exception:  # psycopg2.OperationalError, mostly: not up (yet)
            return False
        return True

    def start(self) -> None:
        bindir, owner = find_postgres(), _postgres_owner(self.stack.dir)
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.log.touch(mode=0o600)
        for path in (self.data, self.log):  # pg_ctl writes the log as the server's user
            os.chown(path, owner, -1)
        if not (self.data / "PG_VERSION").is_file():
            pwfile = self.stack.dir / ".initdb.pw"
            _private_file(pwfile, self.stack.secrets["postgres_password"], owner)
            try:
                self._run(bindir / "initdb", "-D", self.data, "-U", DB_USER, f"--pwfile={pwfile}", "-A",
                          "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync", what="initdb")
            finally:
                pwfile.unlink(missing_ok=True)
        options = f"-c listen_addresses={HOST} -p {self.port} -k {self.data}"
        self._run(bindir / "pg_ctl", "-D", self.data, "-w", "-t", START_TIMEOUT_S[self.name], "-l", self.log,
                  "-o", options, "start", what="pg_ctl start")
        self.record(self.pid())

    def _run(self, *cmd: str | int | Path, what: str) -> None:
        as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        out = subprocess.run([*as_owner, *map(str, cmd)], capture_output=True, text=True,
                             start_new_session=True)
        if out.returncode != 0:
            with open(self.log, "a") as fh:
                fh.write(out.stdout + out.stderr)
            last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
            raise self.failed(f"{what} failed ({last[0]})")

    def provision(self) -> None:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database")
            existing = {row[0] for row in cur.fetchall()}
            for db in {"mlflow", "mlflow_auth"} - existing:
                cur.execute(f'CREATE DATABASE "{db}"')

    def stop(self) -> None:
        if pid := self.pid():
            with contextlib.suppress(StackError):
                self._run(find_postgres() / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t",
                          STOP_TIMEOUT_S, "stop", what="pg_ctl stop")
            if self.pid():
                with contextlib.suppress(OSError):
                    _terminate_group(os.getpgid(pid))
        self.stack.state["pids"].pop(self.name, None)
        self.stack.state["started"].pop(self.name, None)


def _postgres_owner(folder: Path) -> int:
    """The uid PostgreSQL runs as: ours, or as root the ``postgres`` user's, which must be able
    to enter ``folder`` and its parents."""
    if os.geteuid() != 0:
        return -1  # os.chown: unchanged
    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise StackError("as root PostgreSQL runs as the `postgres` OS user (initdb refuses root), and there "
                         "is none: install the apt package postgresql, or run as another user") from None
    for path in (folder, *folder.parents):
        st = path.stat()
        group_x = st.st_gid == user.pw_gid and st.st_mode & 0o010
        if not (st.st_uid == user.pw_uid or st.st_mode & 0o001 or group_x):
            raise StackError(f"the postgres OS user cannot enter {path} (mode {st.st_mode & 0o777:o}), so "
                             f"PostgreSQL cannot use {folder}: `chmod o+x {path}`, or pass another --dir")
    return user.pw_uid


class _SeaweedFS(_Piece):
    name = "seaweedfs"

    def port_keys(self) -> list[str]:
        return list(WEED_PORTS)

    def start(self) -> None:
        data = self.stack.dir / "seaweedfs"
        data.mkdir(mode=0o700, exist_ok=True)  # weed writes mini.options (every flag) there, 0644
        cmd = [_tool("weed"), "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
               *(f"-{flag}={self.stack.ports[key]}" for key, flag in WEED_PORTS.items()),
               "-master.telemetry=false", "-webdav=false", "-admin.ui=false",  # the admin server still runs
               "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0"]  # 0 = not started
        s3 = self.stack.s3
        # With both in its environment weed makes an S3 identity of them and refuses anonymous requests.
        env = _server_env(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key)
        self.record(_spawn(cmd, self.log, env, data))

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        s3 = self.stack.s3
        return boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                            aws_secret_access_key=s3.secret_key, region_name="us-east-1",
                            config=Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}))

    def healthy(self, *, bucket: bool = True) -> bool:
        """S3 answers a signed request (about the bucket, unless ``bucket`` is False)."""
        try:
            client = self.client()
            client.head_bucket(Bucket=BUCKET) if bucket else client.list_buckets()
        except Exception:  # botocore's connection and client errors: not up (yet)
            return False
        return True

    def answering(self) -> bool:
        return self.healthy(bucket=False)

    def provision(self) -> None:
        if not self.healthy():
            self.client().create_bucket(Bucket=BUCKET)


class _MLflow(_Piece):
    name = "mlflow"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/health", timeout=3) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self) -> None:
        home, sec = self.stack.dir / "mlflow", self.stack.secrets
        home.mkdir(mode=0o700, exist_ok=True)
        pg_port = self.stack.ports["postgres"]
        db = f"postgresql+psycopg2://{DB_USER}:{sec['postgres_password']}@{HOST}:{pg_port}"
        ini = home / "auth.ini"
        _private_file(ini, AUTH_INI.format(database_uri=f"{db}/mlflow_auth", admin=ADMIN_USER))
        env = _server_env(
            MLFLOW_BACKEND_STORE_URI=f"{db}/mlflow",  # = --backend-store-uri, without showing in `ps`
            MLFLOW_S3_ENDPOINT_URL=self.stack.s3.endpoint,
            AWS_ACCESS_KEY_ID=sec["s3_access_key"], AWS_SECRET_ACCESS_KEY=sec["s3_secret_key"],
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # else a job runner and 5 more processes, ~2 GB
            MLFLOW_DISABLE_TELEMETRY="true",
            MLFLOW_AUTH_CONFIG_PATH=str(ini),
            MLFLOW_AUTH_ADMIN_PASSWORD=sec["mlflow_admin_password"],  # read once: creates the admin
            MLFLOW_FLASK_SERVER_SECRET_KEY=sec["flask_secret_key"],
        )
        cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
               "--host", HOST, "--port", str(self.port), "--workers", str(MLFLOW_WORKERS),
               "--app-name", "basic-auth"]
        self.record(_spawn(cmd, self.log, env, home))


AUTH_INI = """\
# Written by `python -m cnnlab_stack up` (cnnlab_stack.stack) at each start: edits are overwritten.
[mlflow]
# READ: every logged-in team member sees every experiment and model (results are shared), but
# only its creator (who gets MANAGE) and users granted EDIT change it: nobody logs into someone
# else's experiment by mistake. NO_PERMISSIONS would hide work from the team.
default_permission = READ
database_uri = {database_uri}
admin_username = {admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


# --- the stack --------------------------------------------------------------------------------


class Stack:
    """The stack whose state is in ``root`` (default: `default_dir`). ``ports``: mlflow, postgres,
    s3 -> a port, 0 (any free one) or None (the default if free); saved ports are kept."""

    def __init__(self, root: Path | None = None, ports: Mapping[str, int | None] | None = None,
                 say: Callable[[str], None] | None = None) -> None:
        self.dir = Path(root).absolute() if root else default_dir()
        self.requested = dict(ports or {})
        self.say = say or (lambda text: print(text, file=sys.stderr, flush=True))
        self.state_file = self.dir / "stack.json"
        self.state = self._load()
        self.pieces = [_Postgres(self), _SeaweedFS(self), _MLflow(self)]

    @property
    def ports(self) -> dict[str, int]:
        return self.state.get("ports", {})

    @property
    def secrets(self) -> dict[str, str]:
        if "secrets" not in self.state:
            raise StackError(f"no stack in {self.dir}: run {UP} first")
        return self.state["secrets"]

    @property
    def s3(self) -> S3Info:
        keys = self.secrets
        return S3Info(f"http://{HOST}:{self.ports['s3']}", keys["s3_access_key"], keys["s3_secret_key"])

    def client_env(self) -> dict[str, str]:
        """What a tracking client needs: MLFLOW_TRACKING_URI, _USERNAME and _PASSWORD (the admin)."""
        password = self.secrets["mlflow_admin_password"]  # first: raises when there is no stack
        return {"MLFLOW_TRACKING_URI": f"http://{HOST}:{self.ports['mlflow']}",
                "MLFLOW_TRACKING_USERNAME": ADMIN_USER, "MLFLOW_TRACKING_PASSWORD": password}

    def up(self) -> None:
        """Start the pieces not running and healthy, just those; a no-op when all are."""
        with self._lock():
            self._prepare()
            todo = [piece for piece in self.pieces if not (piece.pid() and piece.healthy())]
            for piece in todo:
                piece.stop()  # what a dead or hung one left, e.g. the workers of a killed MLflow
            for piece in todo:  # all before any start: a taken port stops nothing half-way
                piece.check_ports()
            for piece in todo:
                self.say(f"{piece.name}: starting on {HOST}:{piece.port} (log: {piece.log})")
                started = time.monotonic()
                try:
                    piece.start()
                    piece.wait_ready()
                except StackError:
                    raise
                except Exception as e:  # e.g. the database or the bucket refused: still one message
                    raise piece.failed(f"failed to start ({type(e).__name__}: {e})") from None
                finally:
                    self._save()  # its pid, even if it failed: `down` stops it
                self.say(f"{piece.name}: up in {time.monotonic() - started:.1f} s (pid {piece.pid()})")

    def down(self) -> None:
        """Stop MLflow, SeaweedFS and PostgreSQL; data, ports and secrets stay for the next `up`."""
        if not self.state_file.is_file():
            return
        with self._lock():
            for piece in reversed(self.pieces):
                if pid := piece.pid():
                    self.say(f"{piece.name}: stopping (pid {pid})")
                piece.stop()
                self._save()

    def status(self) -> dict[str, dict[str, Any]]:
        """Per piece: running, pid, port, healthy, log."""
        out = {}
        for piece in self.pieces:
            pid = piece.pid()
            out[piece.name] = {"running": pid is not None, "pid": pid, "port": piece.port,
                               "healthy": pid is not None and piece.healthy(), "log": str(piece.log)}
        return out

    def processes(self) -> dict[str, list[int]]:
        """Per piece: the pids of its running processes (main process and descendants)."""
        return {p.name: process_tree(pid) if (pid := p.pid()) else [] for p in self.pieces}

    def configure_dvc_remote(self, name: str = "stack", repo: Path | None = None) -> None:
        """Make the bucket's ``dvc/`` the default DVC remote of ``repo`` (default: the cwd's);
        the keys go to .dvc/config.local only, so they never enter git."""
        s3 = self.s3
        for args in (["remote", "add", "-d", "-f", name, f"s3://{BUCKET}/dvc"],
                     ["remote", "modify", name, "endpointurl", s3.endpoint],
                     # "--": a generated key may start with "-", which dvc would read as an option
                     ["remote", "modify", "--local", name, "access_key_id", "--", s3.access_key],
                     ["remote", "modify", "--local", name, "secret_access_key", "--", s3.secret_key]):
            out = subprocess.run([_tool("dvc"), *args], cwd=repo, capture_output=True, text=True)
            if out.returncode != 0:
                shown = " ".join(args[:-1] if "--local" in args else args)  # never the key itself
                raise StackError(f"`dvc {shown}` failed: {out.stderr.strip() or out.stdout.strip()}")

    def _prepare(self) -> None:
        if "secrets" not in self.state and (self.dir / "postgres").exists():
            raise StackError(f"{self.dir} holds a stack's data but not its stack.json (its secrets): "
                             f"remove {self.dir} to start afresh, or pass another --dir")
        for key in SECRETS:
            self.state.setdefault("secrets", {}).setdefault(key, _secret(key))
        ports = choose_ports(self.ports, self.requested)
        for piece in self.pieces:
            if piece.pid() and any(ports[key] != self.ports.get(key) for key in piece.port_keys()):
                raise StackError(f"{piece.name} is running on port {piece.port}: run `python -m cnnlab_stack "
                                 "down` before giving it another port")
        self.state["ports"] = ports
        self._save()

    def _save(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as fh:
            json.dump(self.state, fh, indent=2)
        os.replace(tmp, self.state_file)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One `up`/`down` at a time per stack; the state is read again once it is ours."""
        for folder in (self.dir, self.dir / "logs"):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o711 if os.geteuid() == 0 else 0o700)  # root: postgres must pass through
        with open(self.dir / ".lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            self.state = self._load()
            yield

    def _load(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}
        except (OSError, ValueError) as e:
            raise StackError(f"cannot read {self.state_file} ({e}): restore it, or remove {self.dir} "
                             "to start a fresh stack") from None
        return state | {"pids": state.get("pids", {}), "started": state.get("started", {})}


def _secret(key: str) -> str:
    if key == "s3_access_key":
        return "CNNLAB" + secrets.token_hex(7).upper()  # AWS-like: 20 characters, A-Z 0-9
    # URL-, shell- and ini-safe ([A-Za-z0-9_-]); the letter first, so no tool reads it as an option
    return "s" + secrets.token_urlsafe(32)
