"""The served model on ONNX Runtime (``serving.runtime: onnx``, the default): no torch where it serves.

`register` exports each network to ONNX (`cnnlab.serving.onnx_export`, parity-checked on the test
split) and logs this pyfunc around the graph, so the environment MLflow builds from the model's
``requirements.txt`` holds mlflow-skinny, numpy, pandas, Pillow and onnxruntime, and no torch,
timm or CUDA wheels. Requests, answers, limits, errors and the preprocessing (numpy + Pillow) are
every cnnlab model's (`cnnlab.serving.protocol`), so it answers what the PyTorch pyfunc answers.

One class serves a single network and an ensemble. Artifacts: ``model`` (a folder with
``model.onnx`` and the network's ``spec.json``) and ``pytorch`` (the trained `Classifier` folder,
for `python -m cnnlab predict --explain` and whoever wants the PyTorch model); an ensemble has
``member.<name>`` and ``pytorch.<name>`` per member. Model config: the single model's
(``temperature``, ``tta``), or the ensemble's (``members``: ``{name, temperature, tta}`` each, and
the ensemble's ``temperature``), plus ``providers``: ``auto`` or a list of ONNX Runtime execution
providers to try in order.

Execution providers: ``auto`` takes the first available of `PREFERRED_PROVIDERS` (CUDA, ROCm,
DirectML, CoreML, OpenVINO, then the CPU); the provider each network loaded on is printed at start.
Where an NVIDIA GPU is present but the installed onnxruntime has no CUDA provider, a warning says
how to get it (``onnxruntime-gpu``) instead of serving on the CPU in silence.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
from mlflow.models.model import ModelInfo

from cnnlab.serving.batching import Coalescer
from cnnlab.serving.protocol import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    ServedImageModel,
    answer,
    calibrated_mean,
    config_temperature,
    config_views,
    in_scoring_server,
    log_served,
    networks_mean,
    server_threads,
)

GRAPH_FILE = "model.onnx"
SPEC_FILE = "spec.json"
# Best first; the CPU provider is always there. TensorRT is left out: it builds an engine per
# input shape on first use, minutes for a server's first requests.
PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                       "CoreMLExecutionProvider", "OpenVINOExecutionProvider", "CPUExecutionProvider")
_INPUT, _OUTPUT = "image", "logits"  # cnnlab.serving.onnx_export's names
# Test-time views on numpy batches (N, C, H, W): the names of cnnlab.evaluation.tta.VIEWS.
_VIEWS = {"hflip": lambda x: np.ascontiguousarray(x[..., ::-1])}
_ARTIFACT, _PYTORCH = "member.{}", "pytorch.{}"
# Models-from-code: MLflow copies this file into the model and runs it to build the pyfunc.
_ENTRY_POINT = Path(__file__).with_name("onnx_model.py")

_log = logging.getLogger(__name__)


@dataclass
class _Member:
    name: str | None  # None: the network of a single model
    session: ort.InferenceSession
    classes: list[str]
    mode: str
    size: int
    temperature: float
    views: tuple[str, ...]
    forward: Coalescer | None = None


class OnnxClassifierModel(ServedImageModel):
    """Pyfunc of one ONNX network, or of an ensemble of them (model config ``members``)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = self._load_limits(context)
        self._artifacts = dict(context.artifacts)
        temperature = config_temperature(config.get("temperature", 1.0), "temperature")
        providers = choose_providers(config.get("providers", "auto"))
        # In the scoring server one core per worker is left to the request handling (HTTP, JSON,
        # base64, decoding: Python, one thread at a time): on 2 cores and 32 one-image clients 210
        # requests/s against 183 with both cores for the network (fine_tune; the ensemble 144 against 128).
        threads = server_threads(reserve=1) if in_scoring_server() else 0  # 0: ONNX Runtime's default
        members = config.get("members")
        if members is None:
            self._members = [_load(None, Path(context.artifacts["model"]), temperature,
                                   config_views(config.get("tta"), _VIEWS), providers, threads)]
            self._temperature = None  # the member's own temperature is the model's
        else:
            if len(members) < 2:
                raise ValueError(f"model config members: an ensemble needs at least two, got {len(members)}")
            # No spin-waiting: each member's thread pool would keep the cores busy, polling for work,
            # while the next member runs (ensemble at batch 1: 40 -> 121 images/s on 2 cores).
            self._members = [_load(m["name"], Path(context.artifacts[_ARTIFACT.format(m["name"])]),
                                   config_temperature(m.get("temperature", 1.0), f"members.{m['name']}.temperature"),
                                   config_views(m.get("tta"), _VIEWS), providers, threads, spin=False)
                             for m in members]
            self._temperature = temperature
        if len({tuple(m.classes) for m in self._members}) != 1:
            raise ValueError("the ensemble's members were trained on different classes; re-run `dvc repro`")
        self._classes = self._members[0].classes
        for m in self._members:
            # The server's threads take turns and share passes (cnnlab.serving.batching).
            m.forward = Coalescer(lambda batch, m=m: _probabilities(m, batch), max_rows=64)
        loaded = sorted({m.session.get_providers()[0] for m in self._members})
        print(f"cnnlab: serving on ONNX Runtime {ort.__version__}, {', '.join(loaded)}", file=sys.stderr, flush=True)

    def classify(self, images: Sequence[bytes]) -> pd.DataFrame:
        # Each image decoded once and prepared once per input form the networks read.
        probs = networks_mean(images, [((m.mode, m.size), m.forward) for m in self._members],
                              max_pixels=self._max_pixels, max_total_pixels=self._max_request_pixels,
                              max_side=self._max_side)
        if self._temperature is not None:  # an ensemble: its mean, calibrated
            probs = calibrated_mean(probs, self._temperature)
        return answer(probs, self._classes, self._threshold)

    def networks(self) -> list[tuple[str | None, Any, Any]]:
        """(member name or None, PyTorch network, spec) of each network, from the ``pytorch``
        artifacts, loaded on first use (`python -m cnnlab predict --explain`: needs torch, which
        serving does not)."""
        if getattr(self, "_networks", None) is None:
            from cnnlab.models.classifier import load_classifier

            self._networks = []
            for m in self._members:
                key = "pytorch" if m.name is None else _PYTORCH.format(m.name)
                model, spec = load_classifier(Path(self._artifacts[key]))
                self._networks.append((m.name, model.eval(), spec))
        return self._networks


def _load(name: str | None, folder: Path, temperature: float, views: tuple[str, ...], providers: list[str],
          threads: int, spin: bool = True) -> _Member:
    spec = json.loads((folder / SPEC_FILE).read_text(encoding="utf-8"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(folder / GRAPH_FILE), sess_options=options, providers=providers)
    if providers[0] != "CPUExecutionProvider" and session.get_providers()[0] != providers[0]:
        _log.warning("%s could not start (see ONNX Runtime's message above: usually a missing CUDA or cuDNN "
                     "library); serving on %s", providers[0], session.get_providers()[0])
    return _Member(name, session, list(spec["classes"]), spec["mode"], int(spec["image_size"]), temperature, views)


def _probabilities(m: _Member, batch: np.ndarray) -> np.ndarray:
    """softmax(logits / T) in float64; with views, the mean of their probabilities calibrated as
    `evaluate` fitted it (softmax(log(mean) / T)), as the PyTorch runtime does."""
    outputs = [m.session.run([_OUTPUT], {_INPUT: view})[0] for view in [batch, *(_VIEWS[v](batch) for v in m.views)]]
    if not m.views:
        return softmax(outputs[0].astype(np.float64) / m.temperature)
    return calibrated_mean(np.mean([softmax(o) for o in outputs], axis=0), m.temperature)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row softmax in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def choose_providers(setting: Any) -> list[str]:
    """The execution providers to try, best first: ``auto`` (the preferred ones this onnxruntime
    has) or a list (e.g. ``["CPUExecutionProvider"]`` to keep a GPU free), checked."""
    available = ort.get_available_providers()
    if setting in (None, "auto"):
        chosen = [p for p in PREFERRED_PROVIDERS if p in available]
        if chosen[0] == "CPUExecutionProvider" and nvidia_gpu_present():
            _log.warning("an NVIDIA GPU is present, but this onnxruntime (%s) has no CUDA provider, so the model "
                         "serves on the CPU. To serve on the GPU, install onnxruntime-gpu==%s in place of "
                         "onnxruntime in the serving environment (with --env-manager local: `pip uninstall -y "
                         "onnxruntime && pip install onnxruntime-gpu==%s`)", ort.__version__, ort.__version__,
                         ort.__version__)
        return chosen
    chosen = [setting] if isinstance(setting, str) else list(setting)
    missing = [p for p in chosen if p not in available]
    if missing or not chosen:
        raise ValueError(f"model config providers: {missing or chosen} not available in this onnxruntime; "
                         f"available: {available} (or 'auto')")
    return chosen


def nvidia_gpu_present() -> bool:
    return Path("/dev/nvidiactl").exists() or shutil.which("nvidia-smi") is not None


def log_onnx_model(networks: dict[str | None, tuple[Path, Path]], *, example_images: Sequence[bytes],
                   name: str = "model", max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None,
                   temperature: float = 1.0, conformal_threshold: float = 1.0, coverage: float | None = None,
                   tta: Sequence[str] = (), members: dict[str, dict[str, Any]] | None = None,
                   registered_model_name: str | None = None, tags: dict[str, str] | None = None) -> ModelInfo:
    """Log this pyfunc into the active run, as code (`cnnlab.serving.protocol.log_served`).

    ``networks`` maps None (a single model) or each ensemble member's name, in the order evaluate
    averaged them, to (its ONNX folder, `cnnlab.serving.onnx_export.onnx_folder`; its `Classifier`
    folder). Settings as `cnnlab.serving.pyfunc.log_classifier`'s (``tta``: a single model's views);
    an ensemble gives ``members`` (name -> {temperature, tta}) and its own ``temperature``."""
    settings: dict[str, Any] = {
        "max_pixels": max_pixels, "max_side": max_side, "max_rows": DEFAULT_MAX_ROWS,
        "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS, "temperature": temperature,
        "conformal_threshold": conformal_threshold, "coverage": coverage, "providers": "auto"}
    if members is None:
        (graph, pytorch), = networks.values()
        artifacts = {"model": str(graph), "pytorch": str(pytorch)}
        settings["tta"] = list(tta)
    else:
        artifacts = {}
        for member, (graph, pytorch) in networks.items():
            artifacts[_ARTIFACT.format(member)], artifacts[_PYTORCH.format(member)] = str(graph), str(pytorch)
        settings["members"] = [{"name": m, "temperature": float(members[m]["temperature"]),
                                "tta": list(members[m]["tta"])} for m in networks]
    return log_served(_ENTRY_POINT, name=name, artifacts=artifacts, settings=settings, example_images=example_images,
                      model_class=OnnxClassifierModel, registered_model_name=registered_model_name, tags=tags)
