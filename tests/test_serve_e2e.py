"""`mlflow models serve -m models:/NAME@champion`, for real, serving a classifier trained on real
Fashion-MNIST images: its accuracy on the dataset's own test images, its answers against a
reference preprocessing written apart from the serving code, good images in every request form,
and every kind of bad request answered with a short 4xx that neither quotes the payload nor
carries a stack trace, after which the server still answers.
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
import yaml
from PIL import Image

from helpers import fashion_model
from conftest import use_mlflow_store
from helpers.fashion_model import fashion_subset, png, reference_probabilities, register_fashion
from helpers.tiny_model import encode

pytestmark = pytest.mark.slow

MARKER = "ZZMARKER7f3a"  # base64 alphabet only, so it can sit inside "base64" too
NAME = "e2e-classifier"
CLASSES = fashion_model.SPEC.classes
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
    if not (fashion_model.FASHION_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.fail("Fashion-MNIST is not installed: run `make data-deps` (make test does it)")
    root = tmp_path_factory.mktemp("serve")
    with pytest.MonkeyPatch.context() as mp:
        uri = use_mlflow_store(mp, root)
        model_uri = register_fashion(root, uri, NAME)
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
        assert (g["prediction_set"], g["unsure"]) == (list(w["prediction_set"]), w["unsure"])


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


def served_probabilities(server: Server, images: list[bytes]) -> np.ndarray:
    status, text = server.post(split_body([b64(b) for b in images]))
    assert status == 200, server.explain(f"HTTP {status}: {text[:500]}")
    predictions = json.loads(text)["predictions"]
    assert len(predictions) == len(images) and all(list(p["probabilities"]) == CLASSES for p in predictions)
    probs = np.array([list(p["probabilities"].values()) for p in predictions])
    assert [p["label"] for p in predictions] == [CLASSES[i] for i in probs.argmax(axis=1)]
    return probs


# The dataset's own test images (t10k, never trained on), 30 of each class, labels from its label
# file. Chance is 0.1. Measured: this model (100 training images per class, 5 epochs) gets 0.80 of
# them right; the floor leaves 0.15 for thread-count and library-version drift (about six standard
# errors of a 300-image estimate), and still fails a model or server that only guesses.
TEST_PER_CLASS = 30
ACCURACY_FLOOR = 0.65


def test_the_served_champion_classifies_real_test_images(server: Server) -> None:
    """Against the dataset's labels, which no model code produced: the comparisons above only hold
    the server to an in-process copy of the same pyfunc."""
    pixels, labels = fashion_subset("t10k", TEST_PER_CLASS)
    probs = served_probabilities(server, [png(p) for p in pixels])
    accuracy = float((probs.argmax(axis=1) == labels).mean())
    assert accuracy >= ACCURACY_FLOOR, f"accuracy {accuracy:.3f} on {len(labels)} test images"


def tinted(pixels: np.ndarray, gains: tuple[float, float, float]) -> bytes:
    """A grey image as a colour PNG whose channels differ: a channel mix-up changes the pixels."""
    rgb = np.stack([np.round(pixels * g) for g in gains], axis=-1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, "PNG")
    return buf.getvalue()


def enlarged(pixels: np.ndarray, size: tuple[int, int], fmt: str) -> bytes:
    """A test image as a client might send it: bigger, not square (so the crop matters), re-encoded."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").resize(size, Image.Resampling.BICUBIC).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def reference_images() -> list[bytes]:
    pixels, _ = fashion_subset("t10k", 2)
    return [
        *(png(p) for p in pixels),
        *(tinted(p, (1.0, 0.45, 0.1)) for p in pixels),
        *(tinted(p, (0.1, 0.6, 1.0)) for p in pixels),
        *(enlarged(p, (84, 120), "JPEG") for p in pixels[::2]),
        *(enlarged(p, (150, 60), "PNG") for p in pixels[1::2]),
        enlarged(pixels[0], (1400, 1000), "JPEG"),  # over max_side: shrunk once, then resized
        *IMAGES.values(),
    ]


# What may separate the server from the reference on the same image is float rounding: measured
# below 1e-6. Measured on these images with serving broken on purpose (the largest difference in
# one probability): channels swapped 0.55, resize squashing to a square (no centre crop) 0.94,
# nearest-neighbour resize 0.95, no normalisation 0.91, the split's max_side shrink skipped 0.0011.
PROBABILITY_ATOL = 1e-4


def test_served_answers_match_a_reference_preprocessing(server: Server, tmp_path: Path) -> None:
    """The served probabilities equal those of the registered weights (and registered max_side)
    fed through `fashion_model`'s own decode, resize, crop and normalisation: a preprocessing bug
    in the serving path (channel order, normalisation, resize, crop) fails here even though the
    pyfunc still agrees with itself."""
    model = Path(mlflow.artifacts.download_artifacts(server.model_uri, dst_path=str(tmp_path)))
    pyfunc = yaml.safe_load((model / "MLmodel").read_text())["flavors"]["python_function"]
    images = reference_images()
    want = reference_probabilities(model / pyfunc["artifacts"]["model"]["path"], images,
                                   max_side=pyfunc["config"]["max_side"])
    got = served_probabilities(server, images)
    worst = np.abs(got - want).max(axis=1)  # per image
    off = {i: f"{d:.2g}" for i, d in enumerate(worst) if d > PROBABILITY_ATOL}
    assert off == {}, f"images whose probabilities are off by more than {PROBABILITY_ATOL}: {off}"
    # Labels too, except where the reference's top two are within what the tolerance allows.
    top2 = np.sort(want, axis=1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * PROBABILITY_ATOL
    assert got.argmax(axis=1)[clear].tolist() == want.argmax(axis=1)[clear].tolist()


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
