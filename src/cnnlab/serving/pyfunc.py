"""The PyTorch runtime of the served model (``serving.runtime: torch``): the trained `Classifier`
itself, run by eager PyTorch in the scoring server's process.

Requests, answers, limits and errors are those of every cnnlab model (`cnnlab.serving.protocol`).
The default runtime is ONNX Runtime (`cnnlab.serving.onnx_pyfunc`), whose environment has no
torch; this one serves where the network does not export, and is what `python -m cnnlab predict
--explain` reads gradients from.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models.model import ModelInfo

from cnnlab.evaluation.tta import mean_probabilities, views
from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier
from cnnlab.serving.batching import Coalescer
from cnnlab.serving.protocol import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    ServedImageModel,
    answer,
    config_temperature,
    config_views,
    decode_images,
    in_scoring_server,
    log_served,
    prepared_array,
    server_threads,
)

# Models-from-code: MLflow copies this file into the model and runs it to build the pyfunc.
_ENTRY_POINT = Path(__file__).with_name("pyfunc_model.py")


class ImageClassifierModel(ServedImageModel):
    """Pyfunc wrapper around a saved `Classifier` folder (logged as the ``model`` artifact).

    Reads ``max_pixels`` from the model config (`log_classifier` writes it; `mlflow models
    serve` lets an operator override it through the SERVING_MODEL_CONFIG variable).
    """

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = self._load_limits(context)
        if in_scoring_server():
            limit_threads()
        # The temperature `evaluate` fitted on the calibration split (1.0: a model logged before it).
        self._temperature = config_temperature(config.get("temperature", 1.0), "temperature")
        self._tta = config_views(config.get("tta"))
        self._model, self._spec = load_classifier(Path(context.artifacts["model"]))
        self._model.eval()
        # The server's threads take turns and share passes (cnnlab.serving.batching): under load one batch
        # of the waiting requests' images instead of one small pass per request, all at once.
        self._forward = Coalescer(lambda batch: probabilities(self._model, batch, self._temperature, self._tta),
                                  max_rows=64)

    @property
    def network(self) -> Classifier:
        """The PyTorch model it serves (`python -m cnnlab predict --explain` reads its gradients)."""
        return self._model

    def prepare_upload(self, data: bytes, spec: ModelSpec | None = None) -> torch.Tensor:
        """As every cnnlab model's, for its own network unless ``spec`` names another."""
        return super().prepare_upload(data, spec or self._spec)

    def networks(self) -> list[tuple[str | None, Classifier, ModelSpec]]:
        """(member name or None, network, spec) of each network it runs: one here."""
        return [(None, self._model, self._spec)]

    def classify(self, images: Sequence[bytes]) -> pd.DataFrame:
        return predict_images(self._model, self._spec, images, max_pixels=self._max_pixels, max_side=self._max_side,
                              max_total_pixels=self._max_request_pixels, forward=self._forward,
                              conformal_threshold=self._threshold)


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



def prepared(image: Any, spec: ModelSpec, max_side: int | None) -> torch.Tensor:
    """`cnnlab.serving.protocol.prepared_array` as a tensor: the ONNX runtime's very pixels."""
    return torch.from_numpy(prepared_array(image, spec.mode, spec.image_size, max_side))


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

    The pyfunc is logged as code (`cnnlab/pyfunc_model.py`, `cnnlab.serving.protocol.log_served`);
    its requirements are what loading it and predicting on the example import (torch; timm for a
    transfer model). ``max_pixels`` and
    ``max_side`` are the split stage's limits (its ``preprocess.json``), kept in the model config
    with ``temperature`` (evaluate's, fitted on the calibration split), which divides the logits, and the
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
    settings = {"max_pixels": max_pixels, "max_side": max_side, "max_rows": DEFAULT_MAX_ROWS,
                "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS, "temperature": temperature,
                "conformal_threshold": conformal_threshold, "coverage": coverage, "tta": list(tta)}
    return log_served(_ENTRY_POINT, name=name, artifacts={"model": str(model_dir)}, settings=settings,
                      example_images=example_images, model_class=ImageClassifierModel,
                      registered_model_name=registered_model_name, tags=tags)


def limit_threads() -> None:
    """Cap torch's threads at min(4, usable cores / the server's workers) unless OMP_NUM_THREADS sets them.

    Changes process-wide state, so only entry points call it: the scoring server's model load
    and `python -m cnnlab predict`. torch defaults to every core it sees, which in a container
    can exceed the CPU quota, and a server's workers would oversubscribe; a small CNN gains
    little beyond a few threads.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(server_threads())


