"""A trained network plus everything needed to use it: normalization, classes, input spec.

`Classifier` takes the uint8 tensors that `cnnlab.data.preprocess.prepare` makes and does the
float conversion and normalization itself, so a saved model is complete: training, evaluation
and serving feed it the same thing. A model is saved as ``spec.json`` (how to rebuild it) and
``weights.pt`` (a plain state dict, loaded with ``weights_only=True``: no pickled code).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

# One way: the classifier builds nets from the zoo and the backbones; neither imports this module.
from cnnlab.models import backbones, zoo
from cnnlab.utils.registry import Registry

Builder = Callable[["ModelSpec"], nn.Module]


# @register_kind("name"): how to build the inner network for specs of a new kind (the built-in
# ones are "scratch" and "pretrained"); a kind twice is a ValueError.
_BUILDERS: Registry[Builder] = Registry("model kind")
register_kind = _BUILDERS.register


@dataclass(frozen=True)
class ModelSpec:
    kind: str  # which builder: "scratch" (the model zoo, random init), "pretrained" (a backbone + head)
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
    return Classifier(_BUILDERS.get(spec.kind)(spec), spec.mean, spec.std)


def _zoo_net(spec: ModelSpec) -> nn.Module:
    return zoo.create_model(spec.arch, in_channels=spec.in_channels, num_classes=spec.num_classes,
                            image_size=spec.image_size, **spec.kwargs)


def backbone_net(spec: ModelSpec, *, weights: str | None) -> backbones.BackboneNet:
    """Inner network for a "pretrained" spec. ``spec.kwargs``: dropout (0.0), hidden (None), weights
    (read only by `build_pretrained_classifier`). RGB specs must normalize like the backbone."""
    unknown = sorted(set(spec.kwargs) - {"dropout", "hidden", "weights"})
    if unknown:
        raise ValueError(f"backbone spec got unknown kwargs {unknown}; accepted: dropout, hidden, weights")
    features, info = backbones.create_backbone(spec.arch, weights=weights)
    if spec.mode == "RGB" and (
        len(spec.mean) != 3
        or any(abs(a - b) > 1e-6 for a, b in zip([*spec.mean, *spec.std], [*info.mean, *info.std]))
    ):
        raise ValueError(
            f"backbone {spec.arch!r} expects mean={list(info.mean)}, std={list(info.std)}; "
            f"spec has mean={spec.mean}, std={spec.std}"
        )
    if spec.mode == "L" and (len(spec.mean) != 1 or len(spec.std) != 1):
        raise ValueError(f"a grey ('L') spec needs one mean and one std, got {spec.mean}, {spec.std}")
    head = backbones.make_head(info.feature_dim, spec.num_classes, float(spec.kwargs.get("dropout", 0.0)),
                               spec.kwargs.get("hidden"))
    return backbones.BackboneNet(features, head, grey=spec.mode == "L")


def _backbone_kind_net(spec: ModelSpec) -> nn.Module:
    # weights=None on purpose: load_classifier overwrites every tensor from weights.pt next.
    return backbone_net(spec, weights=None)


def build_pretrained_classifier(spec: ModelSpec) -> Classifier:
    """A new "pretrained" Classifier whose features start from ``spec.kwargs["weights"]`` ("default")."""
    if spec.kind != "pretrained":
        raise ValueError(f"expected a spec of kind 'pretrained', got {spec.kind!r}")
    return Classifier(backbone_net(spec, weights=spec.kwargs.get("weights", "default")), spec.mean, spec.std)


register_kind("scratch")(_zoo_net)
register_kind("pretrained")(_backbone_kind_net)


def save_classifier(model: Classifier, spec: ModelSpec, folder: Path) -> None:
    """Write ``spec.json`` + ``weights.pt`` into ``folder``, each atomically."""
    from cnnlab.utils.files import atomic_write, atomic_write_text

    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / "weights.pt", lambda tmp: torch.save(weights, tmp))
    atomic_write_text(folder / "spec.json", json.dumps(asdict(spec), indent=2) + "\n")


def restore_hint(folder: Path) -> str:
    """What a user runs when a model folder a stage wrote was damaged."""
    return f"restore it with `dvc checkout {folder}` (or re-create it with `dvc repro`)"


def load_spec(folder: Path) -> ModelSpec:
    try:
        return ModelSpec(**json.loads((folder / "spec.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{folder / 'spec.json'}: not a readable model spec ({exc}); {restore_hint(folder)}") from None


def load_classifier(folder: Path) -> tuple[Classifier, ModelSpec]:
    """Rebuild from ``spec.json`` and load ``weights.pt`` safely (tensors only, no code)."""
    spec = load_spec(folder)
    try:
        model = build_classifier(spec)
    except (ValueError, TypeError, KeyError) as exc:  # a spec.json edited into something unbuildable
        raise ValueError(f"{folder / 'spec.json'}: {exc}; {restore_hint(folder)}") from None
    try:
        state = torch.load(folder / "weights.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)  # strict: every tensor, each of the right shape, or nothing
    except Exception as exc:  # a tampered or mismatched file: never half-load it
        reason = str(exc).strip().splitlines()[0][:300]
        raise ValueError(f"{folder / 'weights.pt'}: cannot load weights for {spec.arch} ({type(exc).__name__}: "
                         f"{reason}); {restore_hint(folder)}") from None
    return model.eval(), spec
