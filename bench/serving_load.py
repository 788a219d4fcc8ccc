#!/usr/bin/env python
"""Serving under load and abuse: closed-loop clients against a real `mlflow models serve`.

Run from the repository root, once `dvc repro` has set the alias, on an idle machine::

    .venv/bin/python bench/serving_load.py                     # ~10 min: workers 1 and 2, 32 and 128 clients
    .venv/bin/python bench/serving_load.py --duration 10 --clients 32 --workers 2 --no-abuse
    .venv/bin/python bench/serving_load.py --model models:/cnnlab-classifier/4 models:/cnnlab-classifier/5 \
        --workers 1 --clients 32 --duration 30 --no-abuse     # two models side by side, one after the other
    .venv/bin/python bench/serving_load.py --variant fine_tune --runtime onnx torch \
        --workers 1 --clients 32 --duration 60 --no-abuse     # a variant on ONNX Runtime and on PyTorch

For each model (``--model``, one or more URIs, default the registry alias; or ``--variant`` names,
each served on every ``--runtime`` as `register` logs it, see bench/runtimes.py) and the first 64 test
images of data/split/test.csv it measures, in one run:

* in-process, batch of 64: ``mlflow.pyfunc.load_model(uri).predict`` on 64 raw images in a loop
  for ``--baseline-s`` seconds, in this process before any server starts: the images/s a server
  is compared with;
* for each ``--workers`` count, a fresh ``mlflow models serve --env-manager local -w N`` and, for
  each ``--clients`` count and request kind (1 image, a batch of 16), that many closed-loop
  clients (each sends its next request when its answer arrives, over one keep-alive connection)
  for ``--duration`` seconds: requests/s, images/s, latency p50/p95/p99, errors (non-200 or a
  connection failure), timeouts (no answer within ``--timeout``), and every answer's labels
  checked against the in-process labels of the same images;
* the server's memory (RSS of all its processes) after warm-up and at the end;
* with abuse on (default), against the last server: a 50 MB body, 10,000 rows of tiny images, one
  45-megapixel image, a JSON nested 100,000 deep, and an unterminated body. For each: the status,
  seconds to the answer, the server's RSS after it and whether the server still answers a normal
  request.

The clients are coroutines in this process writing prepared HTTP/1.1 requests on raw sockets,
so they use little CPU next to the server's; on a 2-core machine they still share it. The
report asserts nothing; `tests/test_serving_load.py` runs a small load and checks correctness.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from serving_latency import free_port, load_images, start_server, stop_server  # noqa: E402


@dataclass
class Load:
    """One closed-loop measurement."""

    clients: int
    kind: str
    images_per_request: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    timeouts: int = 0
    wrong: int = 0
    first_error: str = ""

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


def request(port: int, body: bytes, path: str = "/invocations") -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


def body_of(images: list[bytes]) -> bytes:
    rows = [[base64.b64encode(b).decode()] for b in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""  # chunked
    while (size := int((await reader.readuntil(b"\r\n")).strip(), 16)) > 0:
        body += await reader.readexactly(size + 2)
    await reader.readuntil(b"\r\n")
    return status, body


async def closed_loop(port: int, load: Load, requests: list[tuple[bytes, list[str]]], duration: float,
                      timeout: float, check_every: int = 1) -> None:
    """``load.clients`` clients, each cycling through ``requests`` (wire bytes, expected labels)."""
    deadline = time.monotonic() + duration

    async def client(index: int) -> None:
        reader = writer = None
        sent = index
        while time.monotonic() < deadline:
            wire, expected = requests[sent % len(requests)]
            sent += 1
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(wire)
                await writer.drain()
                status, payload = await asyncio.wait_for(read_response(reader), timeout)
            except (asyncio.TimeoutError, TimeoutError):
                load.timeouts += 1
                writer, reader = _close(writer), None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                load.errors += 1
                load.first_error = load.first_error or repr(exc)
                writer, reader = _close(writer), None
                continue
            elapsed = time.perf_counter() - t0
            if status != 200:
                load.errors += 1
                load.first_error = load.first_error or f"{status}: {payload[:300]!r}"
                continue
            load.latencies.append(elapsed)
            if sent % check_every == 0 and labels_of(payload) != expected:
                load.wrong += 1
        _close(writer)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(load.clients)))
    load.seconds = time.perf_counter() - t0


def _close(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        writer.close()
    return None


def labels_of(payload: bytes) -> list[str]:
    return [row["label"] for row in json.loads(payload)["predictions"]]


def rss_mib(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20
    except psutil.Error:
        return float("nan")


def in_process(uri: str, images: list[bytes], seconds: float) -> tuple[float, list[str]]:
    """Images/s of the pyfunc on batches of 64 in this process (in a thread, as the server calls
    it), and its labels for ``images``."""
    import mlflow
    import pandas as pd

    model = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"image": images[:64]}, dtype=object)
    labels = list(model.predict(pd.DataFrame({"image": images}, dtype=object))["label"])
    result = {}

    def loop() -> None:
        model.predict(frame)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.predict(frame)
            n += len(frame)
        result["rate"] = n / (time.perf_counter() - t0)

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    return result["rate"], labels


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, "PNG")
    return buf.getvalue()


def abuse_cases(images: list[bytes]) -> list[tuple[str, bytes]]:
    tiny = base64.b64encode(png(4, 4)).decode()
    junk = base64.b64encode(os.urandom(37_500_000)).decode()  # 50 MB of base64
    return [
        ("50 MB JSON body (one 37.5 MB non-image row)",
         json.dumps({"dataframe_split": {"columns": ["image"], "data": [[junk]]}}).encode()),
        ("10,000 rows of 4x4 PNGs", json.dumps({"dataframe_split": {"columns": ["image"],
                                                                     "data": [[tiny]] * 10_000}}).encode()),
        ("one 45-megapixel PNG (7500x6000)", body_of([png(7500, 6000)])),
        ("JSON nested 100,000 deep", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        ("Content-Length 10 MB, 1 KB sent, then closed", b"x" * 1000),
    ]


async def one_request(port: int, wire: bytes, timeout: float, *, close_early: bool = False) -> tuple[str, float]:
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(wire)
        await writer.drain()
        if close_early:
            writer.close()
            return "closed by client", time.perf_counter() - t0
        status, payload = await asyncio.wait_for(read_response(reader), timeout)
        message = ""
        try:
            message = str(json.loads(payload).get("message", ""))[:90]
        except (ValueError, AttributeError):
            message = payload[:90].decode(errors="replace")
        return f"{status} {message}", time.perf_counter() - t0
    except (asyncio.TimeoutError, TimeoutError):
        return f"no answer in {timeout:.0f} s", time.perf_counter() - t0
    except (OSError, asyncio.IncompleteReadError) as exc:
        return f"connection: {type(exc).__name__}", time.perf_counter() - t0
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["models:/cnnlab-classifier@champion"])
    ap.add_argument("--variant", nargs="+", help="variants of params.yaml, each on every --runtime (not with --model)")
    ap.add_argument("--runtime", nargs="+", choices=["onnx", "torch"], default=["onnx", "torch"])
    ap.add_argument("--split", type=Path, default=Path("data/split"))
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--clients", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per load (default %(default)s)")
    ap.add_argument("--baseline-s", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=20.0, help="seconds of each request kind before measuring")
    ap.add_argument("--timeout", type=float, default=65.0,
                    help="a request without an answer by then is a timeout (default: past the server's own 60 s, which answers 504)")
    ap.add_argument("--no-abuse", action="store_true")
    args = ap.parse_args(argv)

    images, source = load_images(args.split, 64)
    if args.variant:
        from runtimes import runtime_uris

        uris = runtime_uris(args.variant, tuple(args.runtime))
        models = [(f"{variant} on {'ONNX Runtime' if rt == 'onnx' else 'PyTorch'} ({uri})", uri)
                  for variant in args.variant for rt in args.runtime for uri in [uris[(variant, rt)]]]
    else:
        models = [(model, model) for model in args.model]
    sections = []
    for title, model in models:
        print(f"model {title}; {source}; load average {os.getloadavg()[0]:.1f}; {os.cpu_count()} CPUs",
              file=sys.stderr, flush=True)
        sections.append(f"### {title}\n\n" + measure(model, images, args))
    print("\n\n".join(sections))
    return 0


def measure(model: str, images: list[bytes], args: argparse.Namespace) -> str:
    """Every measurement above for one model; its report."""
    baseline, labels = in_process(model, images, args.baseline_s)
    print(f"in-process batch of 64: {baseline:.1f} images/s", file=sys.stderr, flush=True)
    single = [(images[i],) for i in range(len(images))]
    batches = [tuple(images[(i * 16 + j) % len(images)] for j in range(16)) for i in range(len(images))]
    expected = {b: labels[i] for i, b in enumerate(images)}
    rows, abuse_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for workers in args.workers:
            port = free_port()
            proc, startup = start_server(model, port, workers, Path(tmp) / f"serve-{workers}.log", 300)
            try:
                kinds = {"1 image": single, "16 images": batches}
                wires = {k: [(request(port, body_of(list(group))), [expected[g] for g in group]) for group in groups]
                         for k, groups in kinds.items()}
                # Warm up with both kinds at the largest load, so "after warm-up" is the plateau the
                # allocator reaches for the biggest coalesced batch, and growth after it is a leak.
                for kind in kinds:
                    asyncio.run(closed_loop(port, Load(max(args.clients), "warm-up", 1), wires[kind],
                                            args.warmup, args.timeout))
                warm = rss_mib(proc.pid)
                for clients in args.clients:
                    for kind, per in (("1 image", 1), ("16 images", 16)):
                        load = Load(clients, kind, per)
                        asyncio.run(closed_loop(port, load, wires[kind], args.duration, args.timeout))
                        rows.append((workers, load, warm, rss_mib(proc.pid)))
                        print(_row(workers, load, baseline, warm, rss_mib(proc.pid)), file=sys.stderr, flush=True)
                if not args.no_abuse and workers == args.workers[-1]:
                    normal = request(port, body_of(images[:1]))
                    for name, body in abuse_cases(images):
                        early = name.startswith("Content-Length")
                        wire = (request(port, body) if not early else
                                request(port, b"").replace(b"Content-Length: 0", b"Content-Length: 10000000") + body)
                        answer, seconds = asyncio.run(one_request(port, wire, 120, close_early=early))
                        after, _ = asyncio.run(one_request(port, normal, 60))
                        abuse_rows.append((name, len(body), answer, seconds, rss_mib(proc.pid), after))
                        print(abuse_rows[-1], file=sys.stderr, flush=True)
            finally:
                stop_server(proc)
    return report(rows, abuse_rows, baseline, args)


def _row(workers: int, load: Load, baseline: float, warm: float, end: float) -> str:
    images_per_s = load.requests_per_s * load.images_per_request
    return (f"| {workers} | {load.clients} | {load.kind} | {load.requests_per_s:.1f} | {images_per_s:.1f} | "
            f"{images_per_s / baseline:.0%} | {load.percentile(50):.0f} | {load.percentile(95):.0f} | "
            f"{load.percentile(99):.0f} | {load.errors} | {load.timeouts} | {load.wrong} | {warm:.0f} -> {end:.0f} |")


def report(rows: list, abuse_rows: list, baseline: float, args: argparse.Namespace) -> str:
    lines = [f"in-process batch of 64: **{baseline:.1f} images/s** (the 100% below)", "",
             f"{args.duration:.0f} s per row, closed loop, keep-alive; latency in ms; RSS of the server's "
             "processes in MiB, after warm-up -> at the end", "",
             "| workers | clients | request | requests/s | images/s | of in-process | p50 | p95 | p99 | errors | "
             "timeouts | wrong labels | RSS |",
             "| --: | --: | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --- |"]
    lines += [_row(w, load, baseline, warm, end) for w, load, warm, end in rows]
    if abuse_rows:
        lines += ["", "| request | body | answer | seconds | RSS after (MiB) | next normal request |",
                  "| --- | --: | --- | --: | --: | --- |"]
        lines += [f"| {name} | {size / 1e6:.1f} MB | {answer} | {seconds:.1f} | {rss:.0f} | {after} |"
                  for name, size, answer, seconds, rss, after in abuse_rows]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
