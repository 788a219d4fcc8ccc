"""The served ensemble: one pyfunc that runs its members in one process and answers as one model.

Each member is a trained variant's `Classifier` folder (an artifact of its own), served as its own
pyfunc would serve it: the same decode limits and preprocessing (`cnnlab.serving.protocol.networks_mean`),
its temperature and its test-time views, and a `Coalescer` of its own, so under load each member
runs one batch for the requests waiting on it while another request is in the next member. The
members' probabilities are averaged (in float64), and the mean is calibrated by the ensemble's own
temperature: the same arithmetic as `evaluate`'s ensemble row, whose temperature and conformal
threshold the model config carries. Requests and answers are those of the single model
(`cnnlab.serving.pyfunc`), prediction sets included.

Model config: the single model's limits, ``temperature`` and ``conformal_threshold`` (the
ensemble's), ``coverage``, and ``members``: a list of ``{name, temperature, tta}``, one per
member in the order evaluate averaged them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import torch
from mlflow.models.model import ModelInfo

from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier
from cnnlab.serving.batching import Coalescer
from cnnlab.serving.protocol import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MAX_REQUEST_PIXELS,
    DEFAULT_MAX_ROWS,
    answer,
    calibrated_mean,
    config_temperature,
    config_views,
    in_scoring_server,
    log_served,
    networks_mean,
)
from cnnlab.serving.pyfunc import (
    ImageClassifierModel,
    limit_threads,
    probabilities,
)

_ENTRY_POINT = Path(__file__).with_name("ensemble_model.py")
# Artifact key of a member's Classifier folder.
_ARTIFACT = "member.{}"


class EnsembleClassifierModel(ImageClassifierModel):
    """Pyfunc of an ensemble: its members' `Classifier` folders (artifacts ``member.<name>``)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        config = self._load_limits(context)
        if in_scoring_server():
            limit_threads()
        self._temperature = config_temperature(config.get("temperature", 1.0), "temperature")
        members = config.get("members") or []
        if len(members) < 2:
            raise ValueError(f"model config members: an ensemble needs at least two, got {len(members)}")
        self._members = []
        for m in members:
            model, spec = load_classifier(Path(context.artifacts[_ARTIFACT.format(m["name"])]))
            model.eval()
            forward = Coalescer(_member_forward(model, config_temperature(m.get("temperature", 1.0),
                                                                    f"members.{m['name']}.temperature"),
                                                config_views(m.get("tta"))), max_rows=64)
            self._members.append((m["name"], model, spec, forward))
        classes = {tuple(spec.classes) for _, _, spec, _ in self._members}
        if len(classes) != 1:
            raise ValueError("the ensemble's members were trained on different classes; re-run `dvc repro`")
        self._classes = list(classes.pop())
        self._spec = self._members[0][2]  # prepare_upload's default: the first member's input

    @property
    def network(self) -> Classifier:
        """The first member's network (`networks` lists them all)."""
        return self._members[0][1]

    def networks(self) -> list[tuple[str | None, Classifier, ModelSpec]]:
        return [(name, model, spec) for name, model, spec, _ in self._members]

    def classify(self, images: Sequence[bytes]) -> pd.DataFrame:
        networks = [((spec.mode, spec.image_size), lambda batch, f=forward: f(torch.from_numpy(batch)))
                    for _, _, spec, forward in self._members]
        mean = networks_mean(images, networks, max_pixels=self._max_pixels,
                             max_total_pixels=self._max_request_pixels, max_side=self._max_side)
        return answer(calibrated_mean(mean, self._temperature), self._classes, self._threshold)


def _member_forward(model: Classifier, temperature: float, tta: tuple[str, ...]):
    return lambda batch: probabilities(model, batch, temperature, tta)


def log_ensemble(
    members: dict[str, Path],
    member_settings: dict[str, dict[str, Any]],
    *,
    name: str = "model",
    example_images: Sequence[bytes],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    temperature: float = 1.0,
    conformal_threshold: float = 1.0,
    coverage: float | None = None,
    tags: dict[str, str] | None = None,
) -> ModelInfo:
    """Log an ensemble of the saved classifier folders ``members`` (name -> folder, in the order
    evaluate averaged them) as one pyfunc into the active run. ``member_settings`` gives each its
    served ``temperature`` and ``tta`` views (its own, where the ensemble averages calibrated
    probabilities; 1.0 where it averages them as trained); ``temperature`` and
    ``conformal_threshold`` are the ensemble's. Logged as code, like `log_classifier`."""
    settings = {"max_pixels": max_pixels, "max_side": max_side, "max_rows": DEFAULT_MAX_ROWS,
                "max_request_pixels": DEFAULT_MAX_REQUEST_PIXELS, "temperature": temperature,
                "conformal_threshold": conformal_threshold, "coverage": coverage,
                "members": [{"name": m, "temperature": float(member_settings[m]["temperature"]),
                             "tta": list(member_settings[m]["tta"])} for m in members]}
    return log_served(_ENTRY_POINT, name=name, artifacts=member_artifacts(members), settings=settings,
                      example_images=example_images, model_class=EnsembleClassifierModel, tags=tags)


def member_artifacts(members: dict[str, Path]) -> dict[str, str]:
    """The artifacts of an ensemble pyfunc: each member's model folder as ``member.<name>``."""
    return {_ARTIFACT.format(m): str(folder) for m, folder in members.items()}
