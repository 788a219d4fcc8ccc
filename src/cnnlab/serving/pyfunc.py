"""The MLflow pyfunc that `mlflow models serve` loads: encoded image bytes in, class scores out.

Serving reuses the training-side gates (`load_image_bytes`, `prepare`), so a served model sees
the same pixels as evaluation did. Input: a DataFrame with an ``image`` column of raw encoded
bytes (PNG, JPEG, ...) or base64 strings. Output, one row per image: ``label`` (class name),
``label_id``, ``confidence`` (the top probability) and ``probabilities`` (a dict class name ->
probability; the signature declares it as ``Map(double)``, and `mlflow models serve` writes it as
a JSON object), ``prediction_set`` (the classes, most probable first, that hold the true one with
probability ``coverage``) and ``unsure`` (more than one class in that set). The probabilities are
calibrated: the logits are divided by the temperature that `evaluate` fitted on the validation
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
import json
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
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
from cnnlab.data.preprocess import prepare
from cnnlab.evaluation.conformal import prediction_sets
from cnnlab.evaluation.tta import VIEWS, mean_probabilities, views
from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier
from cnnlab.serving.batching import Coalescer

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
# Models-from-code: MLflow copies this file into the model and runs it to build the pyfunc.
_ENTRY_POINT = Path(__file__).with_name("pyfunc_model.py")
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


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around a saved `Classifier` folder (logged as the ``model`` artifact).

    Reads ``max_pixels`` from the model config (`log_classifier` writes it; `mlflow models
    serve` lets an operator override it through the SERVING_MODEL_CONFIG variable).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = self._load_limits(context)
        # The temperature `evaluate` fitted on the validation split (1.0: a model logged before it).
        self._temperature = config_temperature(config.get("temperature", 1.0), "temperature")
        self._tta = config_views(config.get("tta"))
        self._model, self._spec = load_classifier(Path(context.artifacts["model"]))
        self._model.eval()
        # The server's threads take turns and share passes (cnnlab.serving.batching): under load one batch
        # of the waiting requests' images instead of one small pass per request, all at once.
        self._forward = Coalescer(lambda batch: probabilities(self._model, batch, self._temperature, self._tta),
                                  max_rows=64)

    def _load_limits(self, context: mlflow.pyfunc.PythonModelContext) -> dict[str, Any]:
        """The settings every cnnlab pyfunc has: decode limits and the prediction sets' threshold."""
        # Only in the scoring server, whose process is ours to tune; `mlflow.pyfunc.load_model`
        # in someone's notebook or program must leave their torch settings alone.
        if SCORING_SERVER_ENV in os.environ:
            limit_threads()
        config = context.model_config or {}
        self._max_pixels = int(config.get("max_pixels", DEFAULT_MAX_PIXELS))
        self._max_side = config.get("max_side")  # None: models logged before it was recorded
        self._max_rows = int(config.get("max_rows", DEFAULT_MAX_ROWS))
        self._max_request_pixels = int(config.get("max_request_pixels", DEFAULT_MAX_REQUEST_PIXELS))
        # 1.0 (every class in the set) for a model logged without one: no promise is broken.
        self._threshold = float(config.get("conformal_threshold", 1.0))
        return config

    @property
    def network(self) -> Classifier:
        """The PyTorch model it serves (`python -m cnnlab predict --explain` reads its gradients)."""
        return self._model

    def prepare_upload(self, data: bytes, spec: ModelSpec | None = None) -> torch.Tensor:
        """One encoded image as this model (or the one ``spec`` describes) reads it, with the
        limits it serves with."""
        return prepared(load_image_bytes(data, max_pixels=self._max_pixels), spec or self._spec, self._max_side)

    def networks(self) -> list[tuple[str | None, Classifier, ModelSpec]]:
        """(member name or None, network, spec) of each network it runs: one here."""
        return [(None, self._model, self._spec)]

    def classify(self, images: Sequence[bytes]) -> pd.DataFrame:
        """The answer to one request's decoded-to-bytes images (limits and threshold applied)."""
        return predict_images(self._model, self._spec, images, max_pixels=self._max_pixels, max_side=self._max_side,
                              max_total_pixels=self._max_request_pixels, forward=self._forward,
                              conformal_threshold=self._threshold)

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


def predict_images(
    model: Classifier,
    spec: ModelSpec,
    images: Sequence[bytes],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    max_total_pixels: int | None = None,
    batch_size: int = 64,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
    temperature: float = 1.0,
    conformal_threshold: float = 1.0,
) -> pd.DataFrame:
    """Classify encoded images; every image is decoded first, so one bad row fails the request.

    Raises `ServingError` (naming the row) for an empty list or an image that does not decode
    or has more than ``max_pixels`` pixels. ``max_side`` repeats the split stage's one-time
    shrink of large images (after its colour conversion), so a photo is resampled exactly as the
    training and test images were. ``max_total_pixels`` bounds the pixels decoded for the whole
    call: the work stops at the first image that goes over it. ``forward`` (default
    `probabilities` of ``model`` at ``temperature``) maps a batch of prepared images to class
    probabilities; ``conformal_threshold`` gives the prediction sets.
    """
    tensors = [prepared(image, spec, max_side)
               for image in decode_images(images, max_pixels=max_pixels, max_total_pixels=max_total_pixels)]
    forward = forward or (lambda batch: probabilities(model, batch, temperature))
    chunks = [forward(torch.stack(tensors[start : start + batch_size])) for start in range(0, len(tensors), batch_size)]
    return answer(torch.cat(chunks).double().numpy(), spec.classes, conformal_threshold)


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


def config_views(value: Any) -> tuple[str, ...]:
    views_ = tuple(value or ())
    unknown = sorted(set(views_) - set(VIEWS))
    if unknown:
        raise ValueError(f"model config tta: unknown view(s) {unknown}; known: {sorted(VIEWS)}")
    return views_


def prepared(image: Any, spec: ModelSpec, max_side: int | None) -> torch.Tensor:
    """A decoded upload as the model reads it: the split's one-time shrink past ``max_side`` (after
    its colour conversion), then the model's resize, crop and mode (`cnnlab.data.preprocess`)."""
    if max_side is not None:
        image = downscale(convert_mode(image, spec.mode), max_side)
    return prepare(image, mode=spec.mode, size=spec.image_size)


def probabilities(model: Classifier, batch: torch.Tensor, temperature: float = 1.0,
                  tta: Sequence[str] = ()) -> torch.Tensor:
    """softmax(logits / temperature): the calibrated class probabilities (same argmax at any T).
    With ``tta`` views (`cnnlab.evaluation.tta`), the mean of the views' probabilities takes the
    logits' place (its log, divided by T), as `evaluate` fitted T on them."""
    with torch.inference_mode():  # thread-local: entered by whichever thread runs the pass
        if not tta:
            return torch.softmax(model(batch).float() / temperature, dim=1)
        mean = mean_probabilities([model(view) for view in views(batch, tta)])
        return torch.softmax(torch.log(mean.clamp_min(1e-30)) / temperature, dim=1)


def log_classifier(
    model_dir: Path,
    *,
    name: str = "model",
    example_images: Sequence[bytes],
    registered_model_name: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    temperature: float = 1.0,
    conformal_threshold: float = 1.0,
    coverage: float | None = None,
    tta: Sequence[str] = (),
    tags: dict[str, str] | None = None,
) -> ModelInfo:
    """Log a saved classifier folder as a self-contained pyfunc into the active run (``tags`` on
    the logged model).

    The pyfunc is logged as code (`cnnlab/pyfunc_model.py`), not as a pickled object, and
    ``code_paths`` ships the cnnlab package with it, so it loads where cnnlab is not installed.
    MLflow stores the example (at most 2 images) as base64 and, at log time, loads the model and
    predicts on it (only warning if that fails); before that, `_pip_requirements` loads and
    predicts on it to see what the model imports, and that raises on a failure. ``max_pixels`` and
    ``max_side`` are the split stage's limits (its ``preprocess.json``), kept in the model config
    with ``temperature`` (evaluate's, fitted on validation), which divides the logits, and the
    prediction sets' ``conformal_threshold`` for ``coverage`` (evaluate's too; coverage is for the
    reader), and the test-time views ``tta`` evaluate chose (empty: one forward pass per image).

    Served with ``mlflow models serve -m models:/NAME@ALIAS --env-manager local``, it takes
    ``{"dataframe_split": {"columns": ["image"], "data": [["<base64>"], ...]}}``, or the same
    column as ``dataframe_records``, ``{"inputs": {"image": [...]}}``, ``{"inputs": [...]}``,
    ``{"instances": [{"image": ...}, ...]}`` or ``{"instances": [...]}``. Requests the
    scoring server refuses before calling the model get MLflow's own 400, which this model
    cannot shorten: a body that is not JSON (or not UTF-8) is quoted back in full after
    "Input:", and a JSON object without exactly one of those input keys gets a paragraph about
    MLflow 2.0's protocol change.
    """
    # MLflow imports the model's code to check the input example, from the folder it uploads:
    # with bytecode caching on (Python's default) a __pycache__ would ship inside the model.
    dont_write, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        settings = {"max_pixels": max_pixels, "max_side": max_side, "max_rows": DEFAULT_MAX_ROWS,
                    "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS, "temperature": temperature,
                    "conformal_threshold": conformal_threshold, "coverage": coverage, "tta": list(tta)}
        return _log_model(name, model_dir, example_images, registered_model_name, settings, tags)
    finally:
        sys.dont_write_bytecode = dont_write


def _log_model(name: str, model_dir: Path, example_images: Sequence[bytes], registered_model_name: str | None,
               settings: dict[str, Any], tags: dict[str, str] | None) -> ModelInfo:
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=str(_ENTRY_POINT),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(cnnlab.__file__).parent)],
        # Every key an operator may override: MLflow applies SERVING_MODEL_CONFIG (or load_model's
        # model_config) only to keys the logged config already has.
        model_config=settings,
        signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
        input_example=pd.DataFrame({IMAGE_COLUMN: list(example_images[:2])}, dtype=object),
        registered_model_name=registered_model_name,
        pip_requirements=_pip_requirements(model_dir, example_images[:2], settings),
        tags=tags,
    )


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


def limit_threads() -> None:
    """Cap torch's threads at min(4, usable cores) unless OMP_NUM_THREADS sets them.

    Changes process-wide state, so only entry points call it: the scoring server's model load
    and `python -m cnnlab predict`. torch defaults to every core it sees, which in a container
    can exceed the CPU quota, and a server's workers would oversubscribe; a small CNN gains
    little beyond a few threads.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(4, cores or 1)))


def _pip_requirements(model_dir: Path, example_images: Sequence[bytes], settings: dict[str, Any]) -> list[str]:
    """What the model's environment must install, read off the code that loads and serves it.

    `mlflow models serve` and `predict` (unless ``--env-manager local``) and docker builds
    install only these, so they must name what this very model imports: timm for a transfer
    model, not for a scratch one (see `cnnlab.serving.model_env`). Exercised here, as the scoring server
    does it: the pyfunc's own `load_context` and `predict` on the input example.
    """
    from cnnlab.serving.model_env import served_requirements

    def load_and_predict() -> None:
        model = ImageClassifierModel()
        model.load_context(mlflow.pyfunc.PythonModelContext({"model": str(model_dir)}, settings))
        model.predict(None, pd.DataFrame({IMAGE_COLUMN: list(example_images)}, dtype=object))

    return served_requirements(_ENTRY_POINT, Path(cnnlab.__file__).parent, load_and_predict)
