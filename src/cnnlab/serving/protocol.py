"""What every served cnnlab model accepts and answers, whichever runtime runs its network.

Imports no torch: the ONNX model (`cnnlab.serving.onnx_pyfunc`) serves from an environment
without it. The PyTorch model (`cnnlab.serving.pyfunc`) and both ensembles build on it too.

Serving reuses the training-side gates (`load_image_bytes`, `prepare_array`), so a served model sees
the same pixels as evaluation did. Input: a DataFrame with an ``image`` column of raw encoded
bytes (PNG, JPEG, ...) or base64 strings. Output, one row per image: ``label`` (class name),
``label_id``, ``confidence`` (the top probability) and ``probabilities`` (a dict class name ->
probability; the signature declares it as ``Map(double)``, and `mlflow models serve` writes it as
a JSON object), ``prediction_set`` (the classes, most probable first, that hold the true one with
probability ``coverage``) and ``unsure`` (more than one class in that set). The probabilities are
calibrated: the logits are divided by the temperature that `evaluate` fitted on the calibration
split (model config ``temperature``); the sets use its conformal threshold (``conformal_threshold``,
`cnnlab.evaluation.conformal`).

Bad requests get an HTTP 400 whose JSON ``message`` names the row and the reason, never the
payload and never a stack trace. That takes two precautions against MLflow's scoring server
(mlflow/pyfunc/scoring_server, MLflow 3.x), which rewrites the ``message`` of any
`MlflowException` raised while predicting to ``"Failed to predict data '<repr of the input>'.
Error: ..."`` (the repr shows part of the request) and answers any other exception with a
``stack_trace``:

* every failure inside ``predict`` leaves it as a `ServingError`, whose JSON carries the message
  it was raised with, whatever the server did to ``message``;
* MLflow's own schema check, which runs before ``predict`` and fails the same way, is given
  nothing to fail on (see `INPUT_SCHEMA`); ``predict`` does the checking instead.

What the server rejects before the model is involved is answered in MLflow's words: for
``dataframe_*`` requests it base64-decodes the column itself, so a value that is not base64 (or
is null, or a number) gets its short, payload-free "Failed to convert column image ..." 400; for
malformed JSON and bodies without one of its input keys see `log_classifier`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array, Map

import cnnlab
from cnnlab.data.images import (
    ImageDecodeError,
    convert_mode,
    downscale,
    load_image_bytes,
)
from cnnlab.data.preprocess import Mode, prepare_array
from cnnlab.evaluation.conformal import prediction_sets

IMAGE_COLUMN = "image"
# The split stage's default max_image_pixels: serve what the pipeline itself would accept.
DEFAULT_MAX_PIXELS = 40_000_000
# Per request, so one request cannot hold a worker for minutes: rows, and decoded pixels over all
# rows (10,000 tiny images or 50 photos). An operator changes them with SERVING_MODEL_CONFIG.
DEFAULT_MAX_ROWS = 1024
DEFAULT_MAX_REQUEST_PIXELS = 100_000_000
# Optional on paper only: MLflow checks required columns before `predict` runs, and its
# "missing inputs" error reaches the client with the request's contents (see the module
# docstring). Optional, a missing column reaches `predict`, which refuses it in a short message.
INPUT_SCHEMA = Schema([ColSpec(DataType.binary, IMAGE_COLUMN, required=False)])
OUTPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.long, "label_id"),
        ColSpec(DataType.double, "confidence"),
        ColSpec(Map(DataType.double), "probabilities"),
        ColSpec(Array(DataType.string), "prediction_set"),
        ColSpec(DataType.boolean, "unsure"),
    ]
)
# Set in the process that loads the model by MLflow's scoring server (`mlflow models serve`, and
# the images of `mlflow models build-docker`): mlflow.pyfunc.scoring_server._SERVER_MODEL_PATH.
# A private name, so tests/test_serving_pyfunc.py checks that MLflow still uses it.
SCORING_SERVER_ENV = "__pyfunc_model_path__"
# Base64 text as bytes (MIME line breaks allowed): see `_as_bytes`.
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\r\n]+")
# No count of the other columns either: MLflow's schema check has dropped them by now.
_MISSING_COLUMN = (
    f"missing column {IMAGE_COLUMN!r}: send the images, base64-encoded, in one column named"
    f" {IMAGE_COLUMN!r}"
)

_log = logging.getLogger(__name__)

# The test-time views a model config may name (`cnnlab.evaluation.tta.VIEWS` has the same names).
VIEW_NAMES = ("hflip",)


class ServingError(MlflowException):
    """A request the model cannot answer; the scoring server sends exactly `public_message`.

    ``row`` is the index of the image to blame (None when the request as a whole is wrong) and
    ``reason`` the message without its ``"row N: "`` prefix, for callers that report per image.
    The error code picks the HTTP status: INVALID_PARAMETER_VALUE (the default) is 400.
    """

    def __init__(
        self, reason: str, *, row: int | None = None, error_code: int = INVALID_PARAMETER_VALUE
    ) -> None:
        message = reason if row is None else f"row {row}: {reason}"
        super().__init__(message, error_code=error_code)
        self.public_message = message
        self.row = row
        self.reason = reason

    def serialize_as_json(self) -> str:
        # What the scoring server sends; `message` may by now hold its rewrite with the payload.
        body = json.loads(super().serialize_as_json())
        body["message"] = self.public_message
        return json.dumps(body)


class ServedImageModel(mlflow.pyfunc.PythonModel):
    """What the cnnlab pyfuncs share: the request limits and prediction sets' threshold from the
    model config, and `predict`, which turns the request into image bytes, calls `classify` and
    keeps every failure a `ServingError`."""

    def _load_limits(self, context: mlflow.pyfunc.PythonModelContext) -> dict[str, Any]:
        """The settings every cnnlab pyfunc has: decode limits and the prediction sets' threshold."""
        config = context.model_config or {}
        self._max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        self._max_side = config.get("max_side")  # None: models logged before it was recorded
        self._max_rows = int(config.get("max_rows", DEFAULT_MAX_ROWS))
        self._max_request_pixels = int(config.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS))
        # 1.0 (every class in the set) for a model logged without one: no promise is broken.
        self._threshold = float(config.get("conformal_threshold", 1.0))
        return config

    def classify(self, images: Sequence[bytes]) -> pd.DataFrame:
        """The answer to one request's images (encoded bytes), limits and threshold applied."""
        raise NotImplementedError

    def prepare_upload(self, data: bytes, spec: Any) -> Any:
        """One encoded image as the network ``spec`` describes reads it, with the limits it serves
        with, as a torch tensor (`python -m cnnlab predict --explain`: needs torch, serving does not)."""
        import torch

        image = load_image_bytes(data, max_pixels=self._max_pixels)
        return torch.from_numpy(prepared_array(image, spec.mode, spec.image_size, self._max_side))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        try:
            if (rows := _row_count(model_input)) > self._max_rows:  # before any row is decoded
                raise ServingError(f"{rows} images in one request, more than this server takes "
                                   f"({self._max_rows}, model config max_rows): send them in smaller requests")
            return self.classify(_images_from(model_input))
        except ServingError:
            raise
        except Exception as e:
            # Not the request's fault (a bug, memory): the traceback goes to the server's log,
            # the client gets a 500 without it.
            _log.exception("prediction failed")
            raise ServingError(
                "internal error while classifying; details are in the server log",
                error_code=INTERNAL_ERROR,
            ) from e


def in_scoring_server() -> bool:
    """Whether MLflow's scoring server loaded this model: its process is ours to tune (threads);
    `mlflow.pyfunc.load_model` in someone's notebook or program must leave theirs alone."""
    return SCORING_SERVER_ENV in os.environ


def usable_cores() -> int:
    """Cores this process may run on (its affinity: a container's CPU set), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, cores or 1)


def server_threads(cap: int = 4, reserve: int = 0) -> int:
    """Threads for one scoring-server worker's network: its share of the usable cores less
    ``reserve`` (left to its request handling), at least 1 and at most ``cap`` (a small CNN gains
    little beyond a few), so that ``-w N`` workers do not oversubscribe the cores."""
    return max(1, min(cap, usable_cores() // server_workers() - reserve))


def server_workers() -> int:
    """How many worker processes the scoring server runs: uvicorn's ``--workers`` (`mlflow models
    serve -w`), read off this process's command line (one worker runs in uvicorn's own process) or
    its parent's (uvicorn's supervisor of several); 1 where there is none to read (not Linux)."""
    for pid in ("self", str(os.getppid())):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for flag, value in itertools.pairwise(args):
            if flag in (b"--workers", b"-w") and value.isdigit():
                return max(1, int(value))
    return 1


def decode_images(images: Sequence[bytes], *, max_pixels: int, max_total_pixels: int | None) -> Iterator[Any]:
    """Each image decoded (PIL), one at a time so that the caller keeps only what it makes of it; a
    `ServingError` names the first row that does not decode, has more than ``max_pixels`` pixels,
    or takes the request past ``max_total_pixels``."""
    if len(images) == 0:
        raise ServingError(f"no images in the request: send at least one row in {IMAGE_COLUMN!r}")
    total = 0
    for row, data in enumerate(images):
        try:
            image = load_image_bytes(bytes(data), max_pixels=max_pixels)
        except ImageDecodeError as e:
            raise ServingError(e.reason, row=row) from None
        total += image.width * image.height
        if max_total_pixels is not None and total > max_total_pixels:
            raise ServingError(f"the request's images hold more than {max_total_pixels} pixels together "
                               f"(model config max_request_pixels): send them in smaller requests", row=row)
        yield image


def answer(probs: np.ndarray, classes: Sequence[str], conformal_threshold: float) -> pd.DataFrame:
    """The served rows for (N, K) calibrated probabilities: label, confidence, probabilities, and
    the prediction set at ``conformal_threshold`` (most probable first) with ``unsure``."""
    ids = probs.argmax(axis=1)
    sets = prediction_sets(probs, conformal_threshold)
    order = np.argsort(-probs, axis=1, kind="stable")
    members = [[classes[k] for k in row_order if in_set[k]] for row_order, in_set in zip(order, sets)]
    return pd.DataFrame(
        {
            "label": [classes[i] for i in ids],
            "label_id": ids.astype(np.int64),
            "confidence": probs.max(axis=1),
            "probabilities": [dict(zip(classes, map(float, p))) for p in probs],
            "prediction_set": members,
            "unsure": [len(m) > 1 for m in members],
        }
    )


def config_temperature(value: Any, key: str) -> float:
    temperature = float(value)
    if not temperature > 0:
        raise ValueError(f"model config {key} must be > 0, got {temperature}")
    return temperature


def config_views(value: Any, known: Iterable[str] = VIEW_NAMES) -> tuple[str, ...]:
    views_ = tuple(value or ())
    unknown = sorted(set(views_) - set(known))
    if unknown:
        raise ValueError(f"model config tta: unknown view(s) {unknown}; known: {sorted(known)}")
    return views_

def prepared_array(image: Any, mode: Mode, size: int, max_side: int | None) -> np.ndarray:
    """A decoded upload as a model reads it, uint8 (C, size, size): the split's one-time shrink past
    ``max_side`` (after its colour conversion), then the model's resize, crop and mode
    (`cnnlab.data.preprocess.prepare_array`, the training cache's own function)."""
    if max_side is not None:
        image = downscale(convert_mode(image, mode), max_side)
    return prepare_array(image, mode=mode, size=size)


def networks_mean(images: Sequence[bytes], networks: Sequence[tuple[tuple[Mode, int], Callable[[np.ndarray], Any]]],
                  *, max_pixels: int, max_total_pixels: int | None, max_side: int | None,
                  batch_size: int = 64) -> np.ndarray:
    """The mean over ``networks`` of their probabilities (N, K), in float64, for one request's images.

    Each image is decoded once (`decode_images`, limits applied) and prepared once per input form
    (mode, size) the networks read; each network is ((mode, size), forward), where ``forward`` maps a
    uint8 batch (n, C, size, size) of at most ``batch_size`` images to (n, K) probabilities."""
    forms: dict[tuple[Mode, int], list[np.ndarray]] = {form: [] for form, _ in networks}
    for image in decode_images(images, max_pixels=max_pixels, max_total_pixels=max_total_pixels):
        for (mode, size), arrays in forms.items():
            arrays.append(prepared_array(image, mode, size, max_side))
    total = 0.0
    for form, forward in networks:
        arrays = forms[form]
        total = total + np.concatenate([np.asarray(forward(np.stack(arrays[s:s + batch_size])), dtype=np.float64)
                                        for s in range(0, len(arrays), batch_size)])
    return total / len(networks)


def calibrated_mean(mean: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log(mean) / T) in float64: mean probabilities (over views or members), calibrated."""
    logits = np.log(np.clip(mean, 1e-300, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(axis=1, keepdims=True)


def log_served(entry_point: Path, *, name: str, artifacts: dict[str, str], settings: dict[str, Any],
               example_images: Sequence[bytes], model_class: type[ServedImageModel],
               registered_model_name: str | None = None, tags: dict[str, str] | None = None) -> ModelInfo:
    """Log a cnnlab pyfunc into the active run, as code: ``entry_point`` (a models-from-code file
    that declares the model) with the cnnlab package shipped beside it (``code_paths``), so it loads
    where cnnlab is not installed and nothing is pickled. ``settings`` become the model config:
    every key an operator may override (MLflow applies SERVING_MODEL_CONFIG, or load_model's
    model_config, only to keys the logged config already has). ``exercise(example_frame)`` must load
    the model from ``artifacts`` and ``settings`` and predict on the example as serving does: the
    model's ``requirements.txt`` is read off what that imports (`cnnlab.serving.model_env`), and it
    raises if the model cannot answer its own example. MLflow stores the example (at most 2
    images) as base64."""
    from cnnlab.serving.model_env import served_requirements

    example = pd.DataFrame({IMAGE_COLUMN: list(example_images[:2])}, dtype=object)
    package = Path(cnnlab.__file__).parent
    # MLflow imports the model's code to check the input example, from the folder it uploads:
    # with bytecode caching on (Python's default) a __pycache__ would ship inside the model.
    def exercise() -> None:
        model = model_class()
        model.load_context(mlflow.pyfunc.PythonModelContext(artifacts, settings))
        model.predict(None, example)

    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        requirements = served_requirements(entry_point, package, exercise)
        return mlflow.pyfunc.log_model(
            name=name, python_model=str(entry_point), artifacts=artifacts, code_paths=[str(package)],
            model_config=settings, signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
            input_example=example, registered_model_name=registered_model_name, pip_requirements=requirements,
            tags=tags)
    finally:
        sys.dont_write_bytecode = dont_write


def _images_from(model_input: Any) -> list[bytes]:
    """Accept what MLflow may hand over: a DataFrame (usual), a dict of columns, a plain list.

    Messages never quote the input, not even its column names: they came from the request.
    """
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise ServingError(_MISSING_COLUMN)
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, Mapping):
        if IMAGE_COLUMN not in model_input:
            raise ServingError(_MISSING_COLUMN)
        values = model_input[IMAGE_COLUMN]
        values = [values] if isinstance(values, (bytes, str)) else list(values)
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = list(model_input)
    else:
        kind = type(model_input).__name__
        raise ServingError(f"expected a DataFrame with an {IMAGE_COLUMN!r} column, got {kind}")
    return [_as_bytes(row, value) for row, value in enumerate(values)]


def _row_count(model_input: Any) -> int:
    if isinstance(model_input, Mapping):
        values = model_input.get(IMAGE_COLUMN)
        return len(values) if isinstance(values, (list, tuple, pd.Series, np.ndarray)) else 1
    return len(model_input) if hasattr(model_input, "__len__") else 1


def _as_bytes(row: int, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        # For `inputs` / `instances` requests MLflow's binary conversion only casts each JSON
        # string to bytes (it base64-decodes for `dataframe_*` alone), so the base64 text itself
        # arrives here. Telling the two apart is safe: no PNG, JPEG, BMP, TIFF or WebP file is all
        # base64 alphabet (their headers hold other bytes) and every GIF ends with ";".
        return _b64decode(row, data) if _BASE64_TEXT.fullmatch(data) else data
    if isinstance(value, str):
        return _b64decode(row, value)
    raise ServingError(
        f"expected image bytes or a base64 string, got {type(value).__name__}", row=row
    )


def _b64decode(row: int, text: str | bytes) -> bytes:
    # Drop whitespace: base64.encodebytes (and MLflow's own examples) wrap lines at 76.
    compact = b"".join(text.split()) if isinstance(text, bytes) else "".join(text.split())
    try:
        return base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        reason = "not valid base64 (strings must hold base64-encoded image bytes)"
        raise ServingError(reason, row=row) from None
