#!/usr/bin/env python
"""Serving latency: `mlflow models serve` against calling the same pyfunc in-process.

Run from the repository root, once the register stage has set the alias (`dvc repro`)::

    .venv/bin/python bench/serving_latency.py                      # models:/cnnlab-classifier@champion
    .venv/bin/python bench/serving_latency.py --model runs:/RUN_ID/model --requests 500
    .venv/bin/python bench/serving_latency.py --variant fine_tune   # on ONNX Runtime and on PyTorch

For one model (``--model``: any URI `mlflow models serve -m` takes, default the registry alias
that params.yaml's ``registry`` section names) and the first ``--images`` test images of
data/split/test.csv (generated noise PNGs when there is no split), it measures side by side:

* served, 1 image: ``--requests`` POSTs of one image each (``dataframe_split``, base64) to a real
  ``mlflow models serve --env-manager local`` on a free port, over one keep-alive connection,
  after ``--warmup`` untimed ones; p50 / p95 / mean latency and images/s;
* served, batch: ``--batches`` POSTs of ``--batch-size`` images each; images/s;
* in-process, 1 image / batch: the same images through ``mlflow.pyfunc.load_model(uri).predict``
  on raw bytes, in this process, so the difference is what serving adds (HTTP, JSON, base64,
  MLflow's request parsing and schema check).

Timed per call: for the served rows, sending the request body (built and base64-encoded before
timing) until the whole response is read; for the in-process rows, building the one-column
DataFrame and ``predict``. The server and this process run one after the other, never at once;
the server caps its torch threads at min(4, cores) (`cnnlab.serving.pyfunc.limit_threads`), this
process keeps PyTorch's default (one per usable core, the same on up to 4 cores). The report
checks that the served answers equal the in-process ones. It prints figures and asserts nothing.

Run it on an idle machine. When other processes keep the cores busy, OpenMP's spin-waiting
makes torch calls from the main thread (the in-process rows) erratically slow: on the 2-core dev
machine at load 7, one tiny forward took 65 ms from the main thread and 0.2 ms from a worker
thread (where the server calls predict) or with OMP_WAIT_POLICY=PASSIVE. The report prints the
load average and OMP_WAIT_POLICY so a reader can tell.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch
from PIL import Image

from cnnlab.cli.predict import default_model_uri
from cnnlab.data.shards import iter_images
from cnnlab.tracking.runs import tracking_uri

# The machine helper of the sibling benchmark (bench/ is on sys.path when a script there runs).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    path: str
    images_per_call: int
    seconds: list[float]  # one per timed call

    @property
    def images_per_s(self) -> float:
        return self.images_per_call * len(self.seconds) / sum(self.seconds)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load_images(split_dir: Path, n: int) -> tuple[list[bytes], str]:
    """The first ``n`` test images as encoded bytes, and where they came from."""
    if (split_dir / "test.csv").is_file():
        images = list(iter_images(split_dir, "test", limit=n))
        with Image.open(io.BytesIO(images[0])) as im:
            first = f"{im.format} {im.mode} {im.size[0]}x{im.size[1]}"
        return images, f"{len(images)} images from {split_dir / 'test.csv'} (first: {first})"
    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        images.append(buf.getvalue())
    return images, f"{n} generated 64x64 RGB noise PNGs (no {split_dir / 'test.csv'})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(uri: str, port: int, workers: int, log: Path, timeout_s: float) -> tuple[subprocess.Popen, float]:
    """Start `mlflow models serve` and wait for /ping; returns the process and its start-up seconds."""
    bin_dir = Path(sys.executable).parent
    # `mlflow models serve` execs `uvicorn` by name: give it the venv's, as an activated venv would.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri(), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    command = [str(bin_dir / "mlflow"), "models", "serve", "-m", uri, "--env-manager", "local",
               "-p", str(port), "--host", "127.0.0.1", "-w", str(workers)]
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        # Own session, so stop_server can end mlflow, its bash and uvicorn together.
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except (urllib.error.URLError, OSError):
            pass
        if proc.poll() is not None or time.perf_counter() - t0 > timeout_s:
            stop_server(proc)
            tail = log.read_text(errors="replace")[-4000:]
            raise SystemExit(f"`{' '.join(command)}` did not come up (see {log}):\n{tail}")
        time.sleep(0.25)


def stop_server(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def request_body(images: Sequence[bytes]) -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def timed(calls: Sequence[Callable[[], object]], warmup: int) -> tuple[list[float], list[object]]:
    for call in calls[:warmup]:
        call()
    seconds, results = [], []
    for call in calls[warmup:]:
        t0 = time.perf_counter()
        results.append(call())
        seconds.append(time.perf_counter() - t0)
    return seconds, results


def cycle(images: Sequence[bytes], count: int, per_call: int) -> list[list[bytes]]:
    return [[images[(i * per_call + j) % len(images)] for j in range(per_call)] for i in range(count)]


def report(rows: list[Row], header: list[str], checks: list[str]) -> str:
    lines = ["# Serving latency: `mlflow models serve` vs in-process pyfunc", ""]
    lines += [f"- {h}" for h in header]
    lines += ["", "| path | timed calls | images/call | p50 ms | p95 ms | mean ms | images/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        ms = np.array(r.seconds) * 1000
        lines.append(
            f"| {r.path} | {len(r.seconds)} | {r.images_per_call} | {np.percentile(ms, 50):.2f} | "
            f"{np.percentile(ms, 95):.2f} | {ms.mean():.2f} | {r.images_per_s:,.0f} |"
        )
    lines += [""] + [f"- {c}" for c in checks]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="model URI or local model folder (default: params.yaml's registry alias)")
    ap.add_argument("--variant", help="a variant of params.yaml, measured on every --runtime (not with --model)")
    ap.add_argument("--runtime", nargs="+", choices=["onnx", "torch"], default=["onnx", "torch"])
    ap.add_argument("--images", type=int, default=200, help="distinct test images (default: %(default)s)")
    ap.add_argument("--requests", type=int, default=200, help="timed one-image requests (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed calls before each row (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per batched call (default: %(default)s)")
    ap.add_argument("--batches", type=int, default=20, help="timed batched calls (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=1, help="`mlflow models serve -w` (default: %(default)s)")
    ap.add_argument("--split-dir", type=Path, default=ROOT / "data" / "split")
    ap.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /ping")
    args = ap.parse_args(argv)
    if min(args.images, args.requests, args.batch_size, args.batches, args.workers) < 1 or args.warmup < 0:
        ap.error("--images, --requests, --batch-size, --batches and --workers must be >= 1, --warmup >= 0")

    mlflow.set_tracking_uri(tracking_uri())
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.variant:
        from runtimes import runtime_uris

        uris = runtime_uris([args.variant], tuple(args.runtime))
        models = [(f"{args.variant} on {'ONNX Runtime' if rt == 'onnx' else 'PyTorch'}", uris[(args.variant, rt)])
                  for rt in args.runtime]
    else:
        uri = args.model or default_model_uri(ROOT / "params.yaml")
        if Path(uri).exists():  # a local folder: give MLflow an absolute path
            uri = str(Path(uri).resolve())
        models = [(uri, uri)]
    print("\n\n".join(f"### {title}\n\n{measure(uri, args)}" for title, uri in models))
    return 0


def measure(uri: str, args: argparse.Namespace) -> str:
    """Every row above for one model: its report."""
    images, source = load_images(args.split_dir, args.images)
    single = cycle(images, args.warmup + args.requests, 1)
    batched = cycle(images, args.warmup + args.batches, args.batch_size)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    note(f"loading {uri} in-process ...")
    model = mlflow.pyfunc.load_model(uri)
    spec = getattr(model.unwrap_python_model(), "_spec", None)

    def local(group: list[bytes]) -> Callable[[], pd.DataFrame]:
        return lambda: model.predict(pd.DataFrame({"image": group}, dtype=object))

    note("timing in-process ...")
    local_single, local_out = timed([local(g) for g in single], args.warmup)
    local_batch, _ = timed([local(g) for g in batched], args.warmup)

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="serving-latency-") as tmp:
        log = Path(tmp) / "serve.log"
        note(f"starting mlflow models serve on port {port} ...")
        proc, startup_s = start_server(uri, port, args.workers, log, args.startup_timeout)
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)

            def served(body: bytes) -> Callable[[], bytes]:
                def call() -> bytes:
                    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
                    response = conn.getresponse()
                    data = response.read()
                    if response.status != 200:
                        raise SystemExit(f"HTTP {response.status} from the server: {data[:500]!r}")
                    return data
                return call

            note("timing served ...")
            served_single, served_out = timed([served(request_body(g)) for g in single], args.warmup)
            served_batch, _ = timed([served(request_body(g)) for g in batched], args.warmup)
            conn.close()
        finally:
            stop_server(proc)

    # The same images must get the same answers both ways, or the comparison means nothing.
    got = [json.loads(d)["predictions"][0] for d in served_out]
    want = [frame.iloc[0] for frame in local_out]
    same_labels = all(g["label"] == w["label"] for g, w in zip(got, want))
    max_diff = max(
        abs(g["probabilities"][k] - w["probabilities"][k]) for g, w in zip(got, want) for k in w["probabilities"]
    )

    threads = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    header = [
        f"machine: {cpu_model()}, {cores} usable logical CPUs; load average {load_before:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end",
        f"python {platform.python_version()}, torch {torch.__version__} ({threads} threads in this process), "
        f"mlflow {mlflow.__version__}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}",
        f"model: {uri}" + (f" ({spec.arch}, {spec.mode} {spec.image_size}x{spec.image_size}, "
                           f"{len(spec.classes)} classes)" if spec else ""),
        f"images: {source}",
        f"server: `mlflow models serve --env-manager local -w {args.workers}`, ready {startup_s:.1f} s after "
        "start; one keep-alive HTTP connection; requests are `dataframe_split` with base64 images",
        f"calls: {args.warmup} untimed warm-up calls before each row; whole run {time.perf_counter() - t_start:.0f} s",
    ]
    rows = [
        Row("in-process pyfunc, 1 image", 1, local_single),
        Row("served, 1 image", 1, served_single),
        Row(f"in-process pyfunc, batch {args.batch_size}", args.batch_size, local_batch),
        Row(f"served, batch {args.batch_size}", args.batch_size, served_batch),
    ]
    overhead = statistics.median(served_single) - statistics.median(local_single)
    checks = [
        f"serving adds {overhead * 1000:.2f} ms to the median one-image call "
        f"({statistics.median(served_single) / statistics.median(local_single):.1f}x in-process)",
        f"served answers equal in-process ones for the {len(got)} timed one-image requests: labels "
        f"{'yes' if same_labels else 'NO'}, max |probability difference| {max_diff:.2e}",
    ]
    return report(rows, header, checks)


if __name__ == "__main__":
    sys.exit(main())
