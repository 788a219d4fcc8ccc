"""A trained variant made servable as the `register` stage makes it (`cnnlab.serving.publish`)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cnnlab.serving.publish import Exports, example_images, publish, serving_limits


def publish_variant(run_id: str, model_dir: Path, split_dir: Path, runtime: str = "onnx") -> str:
    """The pyfunc URI of ``model_dir`` logged into its run ``run_id`` (in the current tracking store),
    on ``runtime`` (onnx: exported and checked on the split's test images, as register does)."""
    with tempfile.TemporaryDirectory() as tmp:
        exports = Exports(Path(tmp), split_dir, parity_images=None) if runtime == "onnx" else None
        return publish(run_id, model_dir, limits=serving_limits(split_dir), examples=example_images(split_dir),
                       exports=exports)


def serve_and_predict(model_uri: str, cwd: Path, images: list[bytes], timeout_s: float = 180,
                      env: dict[str, str] | None = None, env_manager: str = "local") -> list[dict]:
    """A real `mlflow models serve` of ``model_uri`` (the environment's tracking store, or the one
    ``env`` adds) on a free loopback port: its answers to one request of ``images``; the server is
    stopped afterwards. Its log is ``cwd/serve-<port>.log``."""
    import base64
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bin_dir = Path(sys.executable).parent
    log = cwd / f"serve-{port}.log"
    with open(log, "wb") as fh:
        # PATH: `mlflow models serve` execs `uvicorn` by name; own session, so the group is stopped.
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", env_manager,
                                 "-p", str(port), "--host", "127.0.0.1"], cwd=cwd,
                                env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **(env or {})},
                                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(i).decode()]
                                                                             for i in images]}}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())["predictions"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
