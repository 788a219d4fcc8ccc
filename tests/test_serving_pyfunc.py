"""The logged pyfunc, end to end: log into a real store, load it back, predict on real images.

Every test of the `logged` models runs on both runtimes: ONNX Runtime (the default, exported and
served without torch) and PyTorch (``serving.runtime: torch``); both must answer as the PyTorch
model does in process."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PyFuncModel
from mlflow.pyfunc.scoring_server import invocations
from PIL import Image
from torch import nn

from conftest import use_mlflow_store

from cnnlab.models.classifier import (
    ModelSpec,
    build_classifier,
    load_classifier,
    register_kind,
    save_classifier,
)
from cnnlab.serving.onnx_export import onnx_folder
from cnnlab.serving.onnx_pyfunc import log_onnx_model
from cnnlab.serving.protocol import SCORING_SERVER_ENV
from cnnlab.serving.pyfunc import log_classifier, predict_images
from cnnlab.tracking.runs import tracked_run

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["cat", "dog", "frog"]


@register_kind("test_tiny")
def _tiny(spec: ModelSpec) -> nn.Module:
    pixels = spec.in_channels * spec.image_size**2
    return nn.Sequential(nn.Flatten(), nn.Linear(pixels, spec.num_classes))


def encode(mode: str, size: tuple[int, int], fmt: str, seed: int) -> bytes:
    """Noise, so that different images get visibly different scores."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


IMAGES = [
    encode("RGBA", (31, 17), "PNG", 1),
    encode("L", (12, 40), "PNG", 2),
    encode("RGB", (64, 48), "JPEG", 3),
    encode("L", (9, 9), "JPEG", 4),
    encode("RGB", (8, 8), "PNG", 5),
]


@dataclass
class Logged:
    runtime: str
    spec: ModelSpec
    model_dir: Path
    model_uri: str
    pyfunc: PyFuncModel
    shipped: list[str]  # the model's files right after logging, before anything loaded it


@pytest.fixture(scope="module", params=["onnx", "torch"])
def logged(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Logged]]:
    """One RGB and one L model, logged once per module and runtime (logging costs a few seconds)."""
    runtime = request.param
    root = tmp_path_factory.mktemp(f"serving-{runtime}")
    with pytest.MonkeyPatch.context() as mp:
        use_mlflow_store(mp, root)
        out = {}
        for mode in ("RGB", "L"):
            spec = ModelSpec(
                kind="test_tiny", arch="linear", classes=CLASSES, mode=mode, image_size=8,
                mean=[0.5] * (3 if mode == "RGB" else 1), std=[0.25] * (3 if mode == "RGB" else 1),
            )
            torch.manual_seed(0)
            model_dir = root / f"model_{mode}"
            model = build_classifier(spec)
            save_classifier(model, spec, model_dir)
            with tracked_run(experiment="serving", run_name=mode, tags={}, params={"mode": mode}):
                if runtime == "torch":
                    info = log_classifier(model_dir, example_images=IMAGES[:3], registered_model_name=f"tiny-{mode}")
                else:
                    graph = onnx_folder(model, spec, model_dir, root / f"onnx_{mode}")
                    info = log_onnx_model({None: (graph, model_dir)}, example_images=IMAGES[:3],
                                          registered_model_name=f"tiny-{mode}")
            local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
            shipped = sorted(p.relative_to(local).as_posix() for p in local.rglob("*"))
            out[mode] = Logged(runtime, spec, model_dir, info.model_uri, mlflow.pyfunc.load_model(info.model_uri),
                               shipped)
        yield out


def in_process(logged: Logged, images: list[bytes]) -> pd.DataFrame:
    model, spec = load_classifier(logged.model_dir)
    return predict_images(model, spec, images)


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert got["label"].tolist() == want["label"].tolist()
    assert got["label_id"].tolist() == want["label_id"].tolist()
    np.testing.assert_allclose(
        got["confidence"].to_numpy(float), want["confidence"].to_numpy(float), atol=1e-6
    )
    for g, w in zip(got["probabilities"], want["probabilities"]):
        assert g.keys() == w.keys()
        np.testing.assert_allclose(list(g.values()), list(w.values()), atol=1e-6)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_logged_model_predicts_like_in_process(logged: dict[str, Logged], mode: str) -> None:
    out = logged[mode].pyfunc.predict(pd.DataFrame({"image": IMAGES}))
    assert list(out.columns) == ["label", "label_id", "confidence", "probabilities", "prediction_set", "unsure"]
    assert len(out) == len(IMAGES)
    for _, row in out.iterrows():
        probs = row["probabilities"]
        assert list(probs) == CLASSES
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert row["label"] == CLASSES[row["label_id"]]
        assert row["confidence"] == pytest.approx(max(probs.values())) == probs[row["label"]]
        # Logged without a conformal threshold: the set is every class, most probable first.
        assert list(row["prediction_set"]) == sorted(CLASSES, key=lambda c: -probs[c]) and row["unsure"]
    assert out["probabilities"].map(lambda p: tuple(p.values())).nunique() == len(IMAGES)
    assert_same(out, in_process(logged[mode], IMAGES))


def test_registered_name_loads_the_same_model(logged: dict[str, Logged]) -> None:
    out = mlflow.pyfunc.load_model("models:/tiny-L/1").predict(pd.DataFrame({"image": IMAGES}))
    assert_same(out, in_process(logged["L"], IMAGES))


def test_base64_strings_and_other_containers_match_bytes(logged: dict[str, Logged]) -> None:
    want = in_process(logged["RGB"], IMAGES)
    b64 = [base64.b64encode(b).decode() for b in IMAGES]
    wrapped = [base64.encodebytes(b).decode() for b in IMAGES]  # 76-column lines, as MLflow writes
    model = logged["RGB"].pyfunc
    assert_same(model.predict(pd.DataFrame({"image": b64})), want)
    assert_same(model.predict(pd.DataFrame({"image": wrapped})), want)
    assert_same(model.predict({"image": IMAGES}), want)
    python_model = model.unwrap_python_model()  # MLflow's schema layer would reject a bare list
    assert_same(python_model.predict(None, list(IMAGES)), want)


def test_scoring_server_json_roundtrip(logged: dict[str, Logged]) -> None:
    """What `mlflow models serve` answers: base64 in, plain JSON objects out."""
    model = logged["RGB"].pyfunc

    def serve(images: list[bytes]) -> object:
        rows = [[base64.b64encode(b).decode()] for b in images]
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}})
        return invocations(body, "application/json", model, model.metadata.get_input_schema())

    response = serve(IMAGES)
    assert response.status == 200
    predictions = pd.DataFrame(json.loads(response.response)["predictions"])
    assert_same(predictions, in_process(logged["RGB"], IMAGES))

    bad = b"\x00GARBAGE-PAYLOAD\x00"
    with pytest.raises(MlflowException) as err:
        serve([IMAGES[0], bad])
    # The server prefixes a repr of the request to `message`; what it sends is the JSON below.
    assert "GARBAGE" in err.value.message
    assert err.value.get_http_status_code() == 400
    body = json.loads(err.value.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "row 1: not an image (unrecognized format)"
    assert "stack_trace" not in body


def test_inputs_and_instances_forms_match_dataframe_split(logged: dict[str, Logged]) -> None:
    """MLflow hands these forms over as the base64 text cast to bytes, not decoded."""
    model = logged["RGB"].pyfunc
    want = in_process(logged["RGB"], IMAGES)
    b64 = [base64.b64encode(b).decode() for b in IMAGES]
    schema = model.metadata.get_input_schema()
    bodies = [
        {"inputs": {"image": b64}},
        {"inputs": b64},
        {"instances": [{"image": s} for s in b64]},
        {"instances": b64},
        {"dataframe_records": [{"image": s} for s in b64]},
    ]
    for body in bodies:
        response = invocations(json.dumps(body), "application/json", model, schema)
        assert response.status == 200, body.keys()
        assert_same(pd.DataFrame(json.loads(response.response)["predictions"]), want)


def test_unexpected_failure_is_a_500_without_traceback(
    logged: dict[str, Logged], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = logged["RGB"].pyfunc
    python_model = model.unwrap_python_model()

    def broken(images: list[bytes]) -> pd.DataFrame:
        raise RuntimeError("SECRET-INTERNAL-DETAIL")

    monkeypatch.setattr(python_model, "classify", broken)
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(PNG).decode()]]}})
    with pytest.raises(MlflowException) as err:
        invocations(body, "application/json", model, model.metadata.get_input_schema())
    assert err.value.get_http_status_code() == 500
    assert isinstance(err.value.__cause__, RuntimeError)  # kept for in-process callers and the log
    sent = err.value.serialize_as_json()
    assert "SECRET" not in sent and "Traceback" not in sent and "stack_trace" not in sent
    assert json.loads(sent)["message"].startswith("internal error while classifying")


PNG = IMAGES[4]
GARBAGE = b"GARBAGE-PAYLOAD-" * 8


@pytest.mark.parametrize(
    ("value", "row", "reason", "payload"),
    [
        (GARBAGE, 1, "not an image", GARBAGE[:16].decode()),
        (PNG[: len(PNG) // 2], 1, "truncated or corrupt", base64.b64encode(PNG[8:40]).decode()),
        ("@@not-base64@@", 1, "not valid base64", "@@not-base64@@"),
        (None, 1, "expected image bytes", "IHDR"),  # nor the good row: no repr of the frame
    ],
    ids=["garbage", "truncated-png", "bad-base64", "none"],
)
def test_bad_rows_name_the_row_not_the_payload(
    logged: dict[str, Logged], value: object, row: int, reason: str, payload: str
) -> None:
    frame = pd.DataFrame({"image": pd.Series([PNG, value], dtype=object)})
    with pytest.raises(MlflowException) as err:
        logged["RGB"].pyfunc.predict(frame)
    assert err.value.error_code == "INVALID_PARAMETER_VALUE"
    assert err.value.message.startswith(f"row {row}: {reason}")
    assert payload not in err.value.message
    assert len(err.value.message) < 200


def test_missing_column_and_empty_input_are_rejected(logged: dict[str, Logged]) -> None:
    model = logged["RGB"].pyfunc
    python_model = model.unwrap_python_model()
    empty = pd.DataFrame({"image": pd.Series([], dtype=object)})
    cases = {
        "missing column 'image'": pd.DataFrame({"img": [GARBAGE]}),
        "no images": empty,
    }
    for message, frame in cases.items():
        # The column is optional in the signature, so MLflow's schema check (whose error quotes
        # the input) lets both through and our own check answers, directly and through pyfunc.
        for predict in (lambda f: python_model.predict(None, f), model.predict):
            with pytest.raises(MlflowException, match=message) as err:
                predict(frame)
            assert err.value.error_code == "INVALID_PARAMETER_VALUE"
            assert "GARBAGE" not in err.value.message and "img" not in err.value.message
    with pytest.raises(MlflowException, match="no images"):
        predict_images(*load_classifier(logged["L"].model_dir), [])


def test_logged_model_ships_code_weights_and_pins(logged: dict[str, Logged]) -> None:
    local = Path(mlflow.artifacts.download_artifacts(logged["RGB"].model_uri))
    onnx = logged["RGB"].runtime == "onnx"
    shipped = [
        "code/cnnlab/__init__.py",
        "code/cnnlab/serving/pyfunc.py",
        "code/cnnlab/models/classifier.py",
        "code/cnnlab/data/images.py",
        "artifacts/model_RGB/weights.pt",  # for onnx: the PyTorch model, beside the graph
        "artifacts/model_RGB/spec.json",
        *(["code/cnnlab/serving/onnx_pyfunc.py", "artifacts/onnx_RGB/model.onnx", "artifacts/onnx_RGB/spec.json"]
          if onnx else []),
    ]
    for part in shipped:
        assert (local / part).is_file(), part
    # No bytecode ships, even where Python caches it (its default): MLflow imports the model's
    # code while logging. (Loading it from a local store later may write a cache there.)
    assert not [p for p in logged["RGB"].shipped if "__pycache__" in p]
    # Logged as code, not pickled: MLflow runs the shipped entry file to build the pyfunc.
    entry = "onnx_model.py" if onnx else "pyfunc_model.py"
    assert (local / entry).is_file() and not list(local.rglob("*.pkl"))
    requirements = (local / "requirements.txt").read_text()
    names = {line.split("==")[0].lower() for line in requirements.split()}
    if onnx:  # served without the training stack
        assert {"onnxruntime", "numpy", "pillow", "pandas"} <= names
        assert not names & {"torch", "torchvision", "timm", "mlflow"} and not [n for n in names if "nvidia" in n]
    else:
        assert f"torch=={torch.__version__.split('+')[0]}" in requirements
    # The scoring server and the pyfunc loader, without the tracking server's UI and database.
    assert f"mlflow-skinny=={mlflow.__version__}" in requirements
    signature = mlflow.models.get_model_info(logged["RGB"].model_uri).signature
    # Optional on paper only (see cnnlab.serving.pyfunc.INPUT_SCHEMA); predict requires it.
    assert signature.inputs.to_dict() == [{"type": "binary", "name": "image", "required": False}]
    outputs = {c["name"]: c["type"] for c in signature.outputs.to_dict()}
    assert outputs == {
        "label": "string", "label_id": "long", "confidence": "double", "probabilities": "map",
        "prediction_set": "array", "unsure": "boolean",
    }
    assert (local / "serving_input_example.json").is_file()


FRESH = """
import base64, importlib.util, json, sys
from pathlib import Path
checkout_src = Path(sys.argv[3]).resolve()
sys.path = [p for p in sys.path if Path(p or ".").resolve() != checkout_src]  # undo the editable install
assert importlib.util.find_spec("cnnlab") is None, "cnnlab still importable from the checkout"
import mlflow, pandas as pd, yaml
local = Path(mlflow.artifacts.download_artifacts(sys.argv[1]))
flavor = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
# The test's model kind is defined only in the test, so register it on the shipped package
# (the same code/ dir load_model puts on sys.path) before loading.
sys.path.insert(0, str(local / flavor["code"]))
from torch import nn
import cnnlab
from cnnlab.models.classifier import register_kind
register_kind("test_tiny")(
    lambda s: nn.Sequential(nn.Flatten(), nn.Linear(s.in_channels * s.image_size**2, s.num_classes))
)
model = mlflow.pyfunc.load_model(sys.argv[1])
images = [base64.b64decode(s) for s in json.loads(Path(sys.argv[2]).read_text())]
out = model.predict(pd.DataFrame({"image": images}))
result = {"cnnlab": cnnlab.__file__, "local": str(local), "predictions": out.to_dict("records")}
print(json.dumps(result))
"""


def test_fresh_process_without_the_checkout(logged: dict[str, Logged], tmp_path: Path) -> None:
    images_file = tmp_path / "images.json"
    images_file.write_text(json.dumps([base64.b64encode(b).decode() for b in IMAGES]))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert env["MLFLOW_TRACKING_URI"].startswith("sqlite:///")  # the module's store, set by `logged`
    done = subprocess.run(
        [sys.executable, "-c", FRESH, logged["RGB"].model_uri, str(images_file), str(REPO / "src")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(result["cnnlab"]).is_relative_to(Path(result["local"]) / "code")
    assert_same(pd.DataFrame(result["predictions"]), in_process(logged["RGB"], IMAGES))


def test_loading_sets_threads_only_inside_the_scoring_server(
    logged: dict[str, Logged], monkeypatch: pytest.MonkeyPatch
) -> None:
    if logged["L"].runtime != "torch":
        pytest.skip("torch's threads: the PyTorch runtime's")
    # The variable is MLflow's private way to hand the scoring server its model.
    assert SCORING_SERVER_ENV == mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    monkeypatch.delenv(SCORING_SERVER_ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # a user's choice, which the server's cap of min(4, cores) is not
        mlflow.pyfunc.load_model(logged["L"].model_uri)  # as in a notebook
        assert torch.get_num_threads() == 1
        if cores < 2:
            pytest.skip("one usable core: the server's cap is 1 thread too, nothing to tell apart")
        monkeypatch.setenv(SCORING_SERVER_ENV, logged["L"].model_uri)
        mlflow.pyfunc.load_model(logged["L"].model_uri)  # as `mlflow models serve` does
        assert torch.get_num_threads() == min(4, cores)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_large_uploads_get_the_pixels_the_split_stage_gave(mode: str) -> None:
    """A raw photo larger than split.max_side is shrunk as the split stage shrinks its images, so
    serving it gives exactly the scores of its stored split copy."""
    from cnnlab.data.images import convert_mode, downscale, load_image_bytes

    spec = ModelSpec(kind="test_tiny", arch="x", classes=CLASSES, mode=mode, image_size=16, mean=[0.5] * (
        1 if mode == "L" else 3), std=[0.25] * (1 if mode == "L" else 3))
    torch.manual_seed(0)
    model = build_classifier(spec).eval()
    photo = encode("RGB", (1200, 700), "JPEG", 7)
    # What split writes (colour conversion, shrink to max_side, PNG) and training later reads.
    stored = io.BytesIO()
    downscale(convert_mode(load_image_bytes(photo, max_pixels=10**8), mode), 512).save(stored, "PNG")
    want = predict_images(model, spec, [stored.getvalue()])
    got = predict_images(model, spec, [photo], max_side=512)
    assert got["probabilities"][0] == pytest.approx(want["probabilities"][0], abs=1e-9)
    unshrunk = predict_images(model, spec, [photo])
    assert unshrunk["probabilities"][0] != pytest.approx(want["probabilities"][0], abs=1e-9)


def test_per_request_limits_and_the_operator_s_override(logged: dict[str, Logged]) -> None:
    """max_rows and max_request_pixels refuse a request before it can hold a worker; the scoring
    server's SERVING_MODEL_CONFIG goes through load_model(model_config=...), as here."""
    from mlflow.exceptions import MlflowException

    model = mlflow.pyfunc.load_model(logged["RGB"].model_uri)
    frame = pd.DataFrame({"image": [IMAGES[0]] * 3}, dtype=object)
    assert len(model.predict(frame)) == 3  # the defaults (1024 rows, 100 MP) take it
    strict = mlflow.pyfunc.load_model(logged["RGB"].model_uri, model_config={"max_rows": 2})
    with pytest.raises(MlflowException, match=r"^3 images in one request, more than this server takes \(2, "):
        strict.predict(frame)
    with pytest.raises(MlflowException, match=r"^3 images in one request"):
        strict.predict({"image": [IMAGES[0]] * 3})  # a dict of columns counts its rows, not its keys
    width, height = Image.open(io.BytesIO(IMAGES[0])).size
    few_pixels = mlflow.pyfunc.load_model(logged["RGB"].model_uri,
                                          model_config={"max_request_pixels": 2 * width * height})
    assert len(few_pixels.predict(frame.iloc[:2])) == 2
    with pytest.raises(MlflowException, match=r"^row 2: the request's images hold more than"):
        few_pixels.predict(frame)
