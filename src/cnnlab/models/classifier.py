"""A trained network plus everything needed to use it: normalization, classes, input spec.

`Classifier` takes the uint8 tensors that `cnnlab.data.preprocess.prepare` makes and does the
float conversion and normalization itself, so a saved model is complete: training, evaluation
and serving feed it the same thing. A model is saved as ``spec.json`` (how to rebuild it) and
``weights.pt`` (a plain state dict, loaded with ``weights_only=True``: no pickled code).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Builder = Callable[["ModelSpec"], nn.Module]
_BUILDERS: dict[str, Builder] = {}


def register_kind(kind: str) -> Callable[[Builder], Builder]:
    """Register how to build the inner network for specs of ``kind`` (e.g. "zoo", "backbone")."""

    def deco(fn: Builder) -> Builder:
        _BUILDERS[kind] = fn
        return fn

    return deco


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # which builder: "zoo" (from-scratch architectures) or a later kind
    arch: str
    classes: list[str]
    mode: Literal["L", "RGB"]  # input colour mode; channels = 1 or 3
    image_size: int
    mean: list[float]
    std: list[float]
    kwargs: dict[str, Any] = field(default_factory=dict)  # passed to the builder (dropout, ...)

    @property
    def in_channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)


class Classifier(nn.Module):
    """uint8 (N, C, H, W) in [0, 255] -> logits; normalization is part of the model."""

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.float() - self.mean) / self.std)


def build_classifier(spec: ModelSpec) -> Classifier:
    if spec.kind not in _BUILDERS:
        _import_builtin_kinds()
    try:
        builder = _BUILDERS[spec.kind]
    except KeyError:
        raise ValueError(f"unknown model kind {spec.kind!r}; known: {', '.join(sorted(_BUILDERS))}") from None
    return Classifier(builder(spec), spec.mean, spec.std)


def _import_builtin_kinds() -> None:
    import cnnlab.models.backbones  # noqa: F401  (registers "backbone")
    import cnnlab.models.zoo  # noqa: F401  (registers "zoo")


def save_classifier(model: Classifier, spec: ModelSpec, folder: Path) -> None:
    """Write ``spec.json`` + ``weights.pt`` into ``folder``, each atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".weights.tmp-")
    os.close(fd)
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, folder / "weights.pt")
    finally:
        Path(tmp).unlink(missing_ok=True)
    from cnnlab.files import atomic_write_text

    atomic_write_text(folder / "spec.json", json.dumps(asdict(spec), indent=2) + "\n")


def load_spec(folder: Path) -> ModelSpec:
    try:
        return ModelSpec(**json.loads((folder / "spec.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{folder / 'spec.json'}: not a readable model spec ({exc})") from None


def load_classifier(folder: Path) -> tuple[Classifier, ModelSpec]:
    """Rebuild from ``spec.json`` and load ``weights.pt`` safely (tensors only, no code)."""
    spec = load_spec(folder)
    model = build_classifier(spec)
    try:
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as exc:  # a tampered or mismatched file: never half-load it
        raise ValueError(f"{folder / 'weights.pt'}: cannot load weights for {spec.arch} ({exc})") from None
    return model.eval(), spec
