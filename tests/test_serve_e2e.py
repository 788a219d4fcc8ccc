"""`mlflow models serve -m models:/NAME@champion`, for real: good images in every request form, and
every kind of bad request answered with a short 4xx that neither quotes the payload nor carries
a stack trace, after which the server still answers.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import use_mlflow_store
from tiny_model import CLASSES, encode, register_tiny

pytestmark = pytest.mark.slow

MARKER = "ZZMARKER7f3a"  # base64 alphabet only, so it can sit inside "base64" too
NAME = "e2e-classifier"
IMAGES = {
    "rgb-jpeg": encode("RGB", (64, 48), "JPEG", 1),
    "grey-png": encode("L", (12, 40), "PNG", 2),
    "rgba-png": encode("RGBA", (31, 17), "PNG", 3),
    "cmyk-jpeg": encode("CMYK", (20, 20), "JPEG", 4),
    "grey-jpeg-bright": encode("L", (30, 30), "JPEG", 5, level=220),
    "large-rgb-jpeg": encode("RGB", (1600, 1200), "JPEG", 6, level=40),  # ~0.7 MB
}
START_TIMEOUT_S = 120


def too_large_png() -> bytes:
    """48 M pixels, over the served model's 40 M default limit, yet only ~50 kB: one flat colour."""
    buf = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Server:
    url: str
    log: Path
    model_uri: str

    def post(self, body: str | bytes, content_type: str = "application/json") -> tuple[int, str]:
        data = body.encode() if isinstance(body, str) else body
        request = urllib.request.Request(
            f"{self.url}/invocations", data=data, headers={"Content-Type": content_type}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def ping(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=5) as response:
                return response.status
        except (urllib.error.URLError, OSError):
            return 0

    def explain(self, what: str) -> str:
        """An assertion message with the server's log, the only place its side is visible."""
        return f"{what}\n--- server log ({self.log}) ---\n{self.log.read_text()[-6000:]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_mlflow_store(mp, root)
        model_uri = register_tiny(root, uri, NAME)
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        # PATH: `mlflow models serve` execs `uvicorn` by name, as an activated venv would find it.
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
        log = root / "serve.log"
        command = [
            str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-p", str(port), "--host", "127.0.0.1",
        ]
        with open(log, "wb") as log_file:
            # Own session: teardown kills the whole group (mlflow, bash, uvicorn), not just mlflow.
            proc = subprocess.Popen(
                command, cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server(f"http://127.0.0.1:{port}", log, model_uri)
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while server.ping() != 200:
                if proc.poll() is not None:
                    pytest.fail(server.explain(f"server exited with {proc.returncode}"))
                if time.monotonic() > deadline:
                    pytest.fail(server.explain(f"no /ping within {START_TIMEOUT_S} s"))
                time.sleep(0.5)
            yield server
        finally:
            _kill_group(proc)
            mlflow.set_tracking_uri(None)  # back to the environment's, for later modules


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def split_body(values: list[object], column: str = "image") -> str:
    return json.dumps({"dataframe_split": {"columns": [column], "data": [[v] for v in values]}})


@pytest.fixture(scope="module")
def expected(server: Server) -> pd.DataFrame:
    """What the registered model answers in this process, for the same images."""
    model = mlflow.pyfunc.load_model(server.model_uri)
    return model.predict(pd.DataFrame({"image": list(IMAGES.values())}))


def assert_matches(server: Server, status: int, text: str, want: pd.DataFrame) -> None:
    assert status == 200, server.explain(f"HTTP {status}: {text[:500]}")
    got = json.loads(text)["predictions"]
    assert [p["label"] for p in got] == want["label"].tolist()
    assert [p["label_id"] for p in got] == want["label_id"].tolist()
    for g, (_, w) in zip(got, want.iterrows()):
        assert list(g["probabilities"]) == CLASSES
        np.testing.assert_allclose(list(g["probabilities"].values()), list(w["probabilities"].values()), atol=1e-6)
        assert g["confidence"] == pytest.approx(w["confidence"], abs=1e-6)


GOOD_FORMS = {
    "dataframe_split": lambda s: {"dataframe_split": {"columns": ["image"], "data": [[v] for v in s]}},
    "dataframe_records": lambda s: {"dataframe_records": [{"image": v} for v in s]},
    "inputs-columns": lambda s: {"inputs": {"image": s}},
    "inputs-list": lambda s: {"inputs": s},
    "instances-records": lambda s: {"instances": [{"image": v} for v in s]},
    "instances-list": lambda s: {"instances": s},
}


@pytest.mark.parametrize("form", list(GOOD_FORMS))
def test_every_request_form_answers_like_in_process(server: Server, expected: pd.DataFrame, form: str) -> None:
    strings = [b64(b) for b in IMAGES.values()]
    status, text = server.post(json.dumps(GOOD_FORMS[form](strings)))
    assert_matches(server, status, text, expected)


def test_single_image_and_line_wrapped_base64(server: Server, expected: pd.DataFrame) -> None:
    data = IMAGES["grey-png"]
    status, text = server.post(split_body([base64.encodebytes(data).decode()]))  # 76-column lines
    assert_matches(server, status, text, expected.iloc[[1]])


# Known answers, independent of the model: tiny_model trained on noise around these grey levels
# (20x20 RGB PNGs, seeds 0-59); these are new draws, in the sizes, modes and formats clients send.
LEVELS = {"dark": 40, "mid": 128, "bright": 215}
SHAPES = [("RGB", (20, 20), "PNG"), ("L", (33, 21), "JPEG"), ("RGB", (64, 48), "JPEG"), ("L", (16, 16), "PNG")]


def labelled_images() -> tuple[list[bytes], list[str]]:
    images, labels = [], []
    for i in range(36):
        label = CLASSES[i % 3]
        mode, size, fmt = SHAPES[(i // 3) % len(SHAPES)]
        images.append(encode(mode, size, fmt, 1000 + i, level=LEVELS[label]))
        labels.append(label)
    return images, labels


def test_the_served_champion_classifies_images_of_known_class(server: Server) -> None:
    """Against labels the model never chose: the answers above only match an in-process copy
    built from the same code, which a shared preprocessing bug would pass. Chance is 1/3."""
    images, labels = labelled_images()
    status, text = server.post(split_body([b64(b) for b in images]))
    assert status == 200, server.explain(f"HTTP {status}: {text[:500]}")
    got = [p["label"] for p in json.loads(text)["predictions"]]
    assert len(got) == len(labels)
    accuracy = sum(g == w for g, w in zip(got, labels)) / len(labels)
    assert accuracy >= 0.9, list(zip(labels, got))


# name -> (body, or a function making it; the start of our message, None for MLflow's own)
BAD_REQUESTS: dict[str, tuple[str | Callable[[], str], str | None]] = {
    "invalid-base64": (split_body([b64(IMAGES["grey-png"]), MARKER + "!!*"]), None),
    "invalid-base64-inputs": (json.dumps({"inputs": [MARKER + "a"]}), "row 0: not valid base64"),
    "not-an-image": (split_body([b64(IMAGES["grey-png"]), b64(MARKER.encode() * 20)]), "row 1: not an image"),
    "truncated-png": (split_body([b64(IMAGES["grey-png"][:60])]), "row 0: truncated or corrupt"),
    "empty": (split_body([]), "no images in the request"),
    "empty-inputs": (json.dumps({"inputs": {"image": []}}), "no images in the request"),
    "over-pixel-limit": (lambda: split_body([b64(too_large_png())]), "row 0: too large: 8000x6000"),
    "wrong-column": (split_body([b64(IMAGES["grey-png"])], column="img" + MARKER), "missing column 'image'"),
    "wrong-column-instances": (json.dumps({"instances": [{"img" + MARKER: "AAAA"}]}), "missing column 'image'"),
    "null-value": (split_body([None]), None),
    "number-value": (split_body([12345]), None),
    "not-a-json-object": (json.dumps([MARKER]), None),
}


def assert_short_clean_4xx(server: Server, status: int, text: str, start: str | None) -> str:
    context = server.explain(f"HTTP {status}: {text[:800]}")
    assert 400 <= status < 500, context
    body = json.loads(text)
    message = body["message"]
    assert MARKER not in text, context
    assert "Traceback" not in text and "stack_trace" not in body, context
    assert len(message) < 300, context
    if start is not None:
        assert message.startswith(start), context
    return message


def assert_still_serving(server: Server) -> None:
    assert server.ping() == 200, server.explain("/ping failed after a bad request")
    status, text = server.post(split_body([b64(IMAGES["rgb-jpeg"])]))
    assert status == 200, server.explain(f"good request failed after a bad one: {text[:500]}")


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_short_4xx_without_payload_or_trace(server: Server, case: str) -> None:
    body, start = BAD_REQUESTS[case]
    status, text = server.post(body() if callable(body) else body)
    assert_short_clean_4xx(server, status, text, start)
    assert_still_serving(server)


def test_wrong_content_type_is_a_415(server: Server) -> None:
    status, text = server.post(split_body([MARKER]), content_type="text/plain")
    assert status == 415 and "Traceback" not in text
    assert_still_serving(server)


@pytest.mark.parametrize(
    "body",
    [
        '{"dataframe_split": {"columns": ["image"], "data": [["' + MARKER + '"]]',  # cut short
        b'{"inputs": ["\xff' + MARKER.encode() + b'"]}',  # not UTF-8
    ],
    ids=["malformed-json", "not-utf8"],
)
def test_malformed_body_is_a_400_that_mlflow_quotes(server: Server, body: str | bytes) -> None:
    """The scoring server parses the body before any model code runs, and its error for a body
    that is not JSON ends with "Input:" and the whole body (mlflow.pyfunc.scoring_server.
    _decode_json_input, MLflow 3.17). No model can shorten that; the rest still holds."""
    status, text = server.post(body)
    assert status == 400, server.explain(text[:800])
    assert "Traceback" not in text and "stack_trace" not in json.loads(text)
    assert_still_serving(server)
    if MARKER in text:
        pytest.xfail("MLflow's scoring server quotes a malformed body back; see the docstring")


def test_body_without_an_input_key_is_a_400_without_payload(server: Server) -> None:
    """MLflow's answer, not ours: long (a paragraph on its 2.0 protocol change), but clean."""
    status, text = server.post(json.dumps({"data" + MARKER: [[MARKER]]}))
    assert status == 400 and MARKER not in text and "stack_trace" not in json.loads(text)
    assert_still_serving(server)
