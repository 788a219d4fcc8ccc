"""A real `mlflow models serve -w 2` under a small closed-loop load and abusive requests
(bench/serving_load.py's clients, fewer seconds): every answer right, none lost, and the server
still serving after each abuse. Throughput and memory are the benchmark's, not asserted here."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator

import mlflow
import pandas as pd
import pytest

import serving_load as sl  # bench/, on sys.path by conftest
from conftest import use_mlflow_store
from serving_latency import free_port, start_server, stop_server
from helpers.tiny_model import encode, register_tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, list[bytes], list[str]]]:
    root = tmp_path_factory.mktemp("load")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_mlflow_store(mp, root)
        model_uri = register_tiny(root, uri, "loaded")
        images = [encode("RGB", (20, 20), "PNG", seed, level) for seed, level in
                  enumerate([40, 128, 215, 60, 150, 230, 30, 110, 200, 90, 170, 20, 140, 250, 75, 185])]
        labels = list(mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"image": images}, dtype=object))["label"])
        assert len(set(labels)) == 3, labels  # the load checks tell the classes apart, not one label
        port = free_port()
        proc, _ = start_server(model_uri, port, 2, root / "serve.log", 300)
        try:
            yield port, images, labels
        finally:
            stop_server(proc)
            mlflow.set_tracking_uri(None)


def _requests(port: int, images: list[bytes], labels: list[str], per: int) -> list[tuple[bytes, list[str]]]:
    out = []
    for i in range(len(images)):
        group = [(i + j) % len(images) for j in range(per)]  # a rotation: every request differs
        out.append((sl.request(port, sl.body_of([images[g] for g in group])), [labels[g] for g in group]))
    return out


@pytest.mark.parametrize("clients,per", [(32, 1), (128, 1), (32, 16)])
def test_every_request_under_load_gets_its_own_right_answer(served, clients: int, per: int):
    port, images, labels = served
    load = sl.Load(clients, f"{per} images", per)
    asyncio.run(sl.closed_loop(port, load, _requests(port, images, labels, per), duration=8, timeout=60))
    assert (load.errors, load.timeouts, load.wrong) == (0, 0, 0), load.first_error
    assert len(load.latencies) >= clients  # every client got at least one answer


def _answer(port: int, body: bytes) -> tuple[int, str]:
    text, _ = asyncio.run(sl.one_request(port, sl.request(port, body), 120))
    status, _, message = text.partition(" ")
    return int(status) if status.isdigit() else -1, message


@pytest.mark.parametrize("case", ["rows", "pixels", "huge body", "nested", "truncated"])
def test_abusive_requests_are_refused_and_the_server_keeps_serving(served, case: str):
    port, images, labels = served
    tiny = base64.b64encode(encode("L", (4, 4), "PNG", 0)).decode()
    if case == "rows":
        status, message = _answer(port, json.dumps({"dataframe_split": {"columns": ["image"],
                                                                         "data": [[tiny]] * 10_000}}).encode())
        assert (status, message.split(" images")[0]) == (400, "10000")
    elif case == "pixels":
        status, message = _answer(port, sl.body_of([sl.png(7500, 6000)]))
        assert status == 400 and "too large: 7500x6000" in message
    elif case == "huge body":
        status, message = _answer(port, json.dumps({"dataframe_split": {"columns": ["image"], "data": [
            [base64.b64encode(b"\0" * 37_500_000).decode()]]}}).encode())
        assert status == 400 and "not an image" in message
    elif case == "nested":  # MLflow's JSON parsing fails before the model: answered, not hung
        status, _ = _answer(port, b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        assert 400 <= status < 600
    else:  # a client that announces 10 MB, sends 1 KB and goes away
        wire = sl.request(port, b"").replace(b"Content-Length: 0", b"Content-Length: 10000000") + b"x" * 1000
        asyncio.run(sl.one_request(port, wire, 5, close_early=True))
    status, payload = _answer(port, sl.body_of(images[:3]))
    assert status == 200, payload
