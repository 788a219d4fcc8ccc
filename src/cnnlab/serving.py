"""The MLflow pyfunc that `mlflow models serve` loads: encoded image bytes in, class scores out.

Serving reuses the training-side gates (`load_image_bytes`, `prepare`), so a served model sees
the same pixels as evaluation did. Input: a DataFrame with an ``image`` column of raw encoded
bytes (PNG, JPEG, ...) or base64 strings. Output, one row per image: ``label`` (class name),
``label_id``, ``confidence`` (the top probability) and ``probabilities`` (a dict class name ->
probability; the signature declares it as ``Map(double)``, and `mlflow models serve` writes it as
a JSON object). A bad input is an `MlflowException` with INVALID_PARAMETER_VALUE, which the
scoring server answers with HTTP 400; messages name the row and reason, never the payload.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Map

import cnnlab
from cnnlab.data.images import ImageDecodeError, load_image_bytes
from cnnlab.data.preprocess import prepare
from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier

IMAGE_COLUMN = "image"
INPUT_SCHEMA = Schema([ColSpec(DataType.binary, IMAGE_COLUMN)])
OUTPUT_SCHEMA = Schema(
    [
        ColSpec(DataType.string, "label"),
        ColSpec(DataType.long, "label_id"),
        ColSpec(DataType.double, "confidence"),
        ColSpec(Map(DataType.double), "probabilities"),
    ]
)
_REQUIREMENTS = ("torch", "torchvision", "pillow", "numpy", "pandas", "mlflow")


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """Pyfunc wrapper around a saved `Classifier` folder (logged as the ``model`` artifact)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        _limit_threads()
        self._model, self._spec = load_classifier(Path(context.artifacts["model"]))
        self._model.eval()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        return predict_images(self._model, self._spec, _images_from(model_input))


def predict_images(
    model: Classifier,
    spec: ModelSpec,
    images: Sequence[bytes],
    *,
    max_pixels: int = 40_000_000,
    batch_size: int = 64,
) -> pd.DataFrame:
    """Classify encoded images; every image is decoded first, so one bad row fails the request."""
    if len(images) == 0:
        raise _invalid("no images in the request")
    tensors = []
    for row, data in enumerate(images):
        try:
            image = load_image_bytes(bytes(data), max_pixels=max_pixels)
        except ImageDecodeError as e:
            raise _invalid(f"row {row}: {e.reason}") from None
        tensors.append(prepare(image, mode=spec.mode, size=spec.image_size))
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(tensors), batch_size):
            batch = torch.stack(tensors[start : start + batch_size])
            chunks.append(torch.softmax(model(batch).float(), dim=1))
    probs = torch.cat(chunks).double().numpy()
    ids = probs.argmax(axis=1)
    return pd.DataFrame(
        {
            "label": [spec.classes[i] for i in ids],
            "label_id": ids.astype(np.int64),
            "confidence": probs.max(axis=1),
            "probabilities": [dict(zip(spec.classes, map(float, p))) for p in probs],
        }
    )


def log_classifier(
    model_dir: Path,
    *,
    name: str = "model",
    example_images: Sequence[bytes],
    registered_model_name: str | None = None,
) -> ModelInfo:
    """Log a saved classifier folder as a self-contained pyfunc into the active run.

    ``code_paths`` ships the cnnlab package with the model, so it loads where cnnlab is not
    installed. MLflow stores the example (at most 2 images) as base64 and, at log time, loads
    the model and predicts on it; a failure there is only logged as a warning, not raised.
    """
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=ImageClassifierModel(),
        artifacts={"model": str(model_dir)},
        code_paths=[str(Path(cnnlab.__file__).parent)],
        signature=ModelSignature(inputs=INPUT_SCHEMA, outputs=OUTPUT_SCHEMA),
        input_example=pd.DataFrame({IMAGE_COLUMN: list(example_images[:2])}, dtype=object),
        registered_model_name=registered_model_name,
        pip_requirements=_pip_requirements(),
    )


def _images_from(model_input: Any) -> list[bytes]:
    """Accept what MLflow may hand over: a DataFrame (usual), a dict of columns, a plain list."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise _invalid(f"missing column {IMAGE_COLUMN!r}")
        values = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, Mapping):
        if IMAGE_COLUMN not in model_input:
            raise _invalid(f"missing key {IMAGE_COLUMN!r}")
        values = model_input[IMAGE_COLUMN]
        values = [values] if isinstance(values, (bytes, str)) else list(values)
    elif isinstance(model_input, (list, tuple, pd.Series, np.ndarray)):
        values = list(model_input)
    else:
        kind = type(model_input).__name__
        raise _invalid(f"expected a DataFrame with an {IMAGE_COLUMN!r} column, got {kind}")
    return [_as_bytes(row, value) for row, value in enumerate(values)]


def _as_bytes(row: int, value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        # Strip whitespace: base64.encodebytes (and MLflow's own examples) wrap lines at 76.
        try:
            return base64.b64decode("".join(value.split()), validate=True)
        except (binascii.Error, ValueError):
            reason = "not valid base64 (strings must hold base64-encoded image bytes)"
            raise _invalid(f"row {row}: {reason}") from None
    raise _invalid(f"row {row}: expected image bytes or a base64 string, got {type(value).__name__}")


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _limit_threads() -> None:
    # torch defaults to every core it sees, which in a container can exceed the CPU quota, and a
    # server's workers would oversubscribe; a small CNN gains little beyond a few threads.
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, min(4, cores or 1)))


def _pip_requirements() -> list[str]:
    pins = []
    for package in _REQUIREMENTS:
        try:
            # Drop a local tag ("2.x+cpu"): PyPI has no such release, so the pin would not resolve.
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:  # still name it: the serving env must have it
            pins.append(package)
    return pins
