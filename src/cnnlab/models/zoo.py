"""From-scratch CNN architectures behind a timm-style registry: ``create_model("resnet", ...)``.

Every builder takes ``(in_channels, num_classes, image_size, dropout=0.0, **own_kwargs)`` and
returns a module mapping float normalized (N, C, H, W) to logits (N, num_classes). Flattened
feature sizes are never hard-coded: they come from a dummy forward at build time, which also
turns "image too small for this many poolings" into a ValueError that names the minimum size.
The spec kind "scratch" (see `cnnlab.models.classifier`) builds its network through `create_model`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import nn

from cnnlab.utils.registry import Registry

Builder = Callable[..., nn.Module]
_MODELS: Registry[Builder] = Registry("model")
_COMMON = ("in_channels", "num_classes", "image_size", "dropout")
_MAX_PROBE = 512  # no architecture here needs more; failing beyond this is a bug, not a size problem


register_model = _MODELS.register  # @register_model("name") adds a builder; a name twice is a ValueError
list_models = _MODELS.names


def create_model(
    name: str, *, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0, **kwargs: object
) -> nn.Module:
    """Build ``name``. All configuration mistakes raise ValueError (so callers catch one type):
    unknown name, a kwarg the builder does not take, bad sizes/rates, an image too small."""
    builder = _MODELS.get(name)
    for arg, value in (("in_channels", in_channels), ("num_classes", num_classes), ("image_size", image_size)):
        _check_positive(arg, value)
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    accepted = [p for p in inspect.signature(builder).parameters if p not in _COMMON]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"model {name!r} got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(accepted) or '(none)'}"
        )
    return builder(in_channels=in_channels, num_classes=num_classes, image_size=image_size, dropout=dropout, **kwargs)


def init_weights(model: nn.Module, scheme: Literal["default", "kaiming"]) -> None:
    """Re-initialize in place. "default" keeps PyTorch's init; "kaiming" is the torchvision
    ResNet/VGG scheme (He et al. 2015, fan_out for ReLU nets; small-normal linear layers)."""
    if scheme == "default":
        return
    if scheme != "kaiming":
        raise ValueError(f"unknown init scheme {scheme!r}; known: default, kaiming")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------- helpers


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_widths(name: str, values: Sequence[int], length: int | None = None) -> list[int]:
    values = list(values)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(values)}")
    for v in values:
        _check_positive(name, v)
    return values


def _drop(p: float) -> nn.Module:
    # Identity keeps the module's slot, so state-dict keys do not depend on the dropout rate.
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _probe(features: nn.Module, in_channels: int, size: int) -> torch.Size | None:
    """(C, H, W) after ``features`` for a size x size input, or None if the input is too small."""
    was_training = features.training
    features.eval()  # eval: no BN running-stat updates, and BN accepts a single 1x1 sample
    try:
        with torch.no_grad():
            return features(torch.zeros(1, in_channels, size, size)).shape[1:]
    except RuntimeError:  # PyTorch's "kernel size can't be greater than input" / "output size is too small"
        return None
    finally:
        features.train(was_training)


def _feature_shape(arch: str, features: nn.Module, in_channels: int, image_size: int) -> torch.Size:
    """Output shape of ``features``; if ``image_size`` is too small, ValueError with the minimum."""
    shape = _probe(features, in_channels, image_size)
    if shape is not None:
        return shape
    # Output sizes only grow with the input, so validity is monotone: double, then bisect.
    bad, good = image_size, max(2 * image_size, 2)
    while _probe(features, in_channels, good) is None:
        if good >= _MAX_PROBE:
            raise RuntimeError(f"{arch}: feature extractor fails for every image size up to {good}")
        bad, good = good, 2 * good
    while good - bad > 1:
        mid = (bad + good) // 2
        bad, good = (mid, good) if _probe(features, in_channels, mid) is None else (bad, mid)
    raise ValueError(f"model {arch!r} needs image_size >= {good}, got {image_size}")


def _flat_size(arch: str, features: nn.Module, in_channels: int, image_size: int) -> int:
    return math.prod(_feature_shape(arch, features, in_channels, image_size))


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int | None = None) -> nn.Sequential:
    padding = kernel // 2 if padding is None else padding
    # No conv bias: the BN shift that follows makes it redundant.
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class _GapNet(nn.Module):
    """features -> global average pool -> dropout -> linear (ResNet/Inception/DenseNet heads)."""

    def __init__(self, features: nn.Module, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), _drop(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def _gap_net(
    arch: str, features: nn.Module, in_channels: int, num_classes: int, image_size: int, dropout: float
) -> nn.Module:
    channels = _feature_shape(arch, features, in_channels, image_size)[0]  # also validates the size
    return _GapNet(features, channels, num_classes, dropout)


# ----------------------------------------------------------------------------- plain conv stacks


@register_model("tinyvgg")
def tinyvgg(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0, hidden_units: int = 10
) -> nn.Module:
    """TinyVGG from CNN Explainer (Wang et al. 2020), as used in the PyTorch deep-learning course."""
    _check_positive("hidden_units", hidden_units)
    h = hidden_units

    def block(cin: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, h, 3, padding=1), nn.ReLU(), nn.Conv2d(h, h, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )

    features = nn.Sequential(block(in_channels), block(h))
    flat = _flat_size("tinyvgg", features, in_channels, image_size)
    return nn.Sequential(features, nn.Flatten(), _drop(dropout), nn.Linear(flat, num_classes))


@register_model("simple_cnn")
def simple_cnn(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0, widths: Sequence[int] = (32, 64, 128)
) -> nn.Module:
    """The common Kaggle/tutorial Fashion-MNIST CNN: conv-BN-ReLU-pool blocks, a 256-unit FC layer.
    Conv blocks drop at ``dropout / 2`` (the usual 0.25 next to the head's 0.5)."""
    widths = _check_widths("widths", widths)
    layers: list[nn.Module] = []
    cin = in_channels
    for w in widths:
        layers += [*_conv_bn_relu(cin, w), nn.MaxPool2d(2), _drop(dropout / 2)]
        cin = w
    features = nn.Sequential(*layers)
    flat = _flat_size("simple_cnn", features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(), nn.Linear(flat, 256), nn.ReLU(), _drop(dropout), nn.Linear(256, num_classes)
    )


@register_model("keras_convnet")
def keras_convnet(in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    """The MNIST convnet of Chollet, *Deep Learning with Python* (ch. 5/8): valid 3x3 convs."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3), nn.ReLU(),
    )  # fmt: skip
    flat = _flat_size("keras_convnet", features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(), _drop(dropout), nn.Linear(flat, 64), nn.ReLU(), nn.Linear(64, num_classes)
    )


@register_model("lenet5")
def lenet5(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    activation: Literal["relu", "tanh"] = "relu",
    pool: Literal["max", "avg"] = "max",
) -> nn.Module:
    """LeNet-5 (LeCun et al. 1998). conv1 is padded by 2 so 28x28 MNIST behaves like the original
    32x32 input; C5 is written as a Linear on the flattened map (identical at 28x28).
    ``activation="tanh", pool="avg"`` is closest to the paper."""
    acts = {"relu": nn.ReLU, "tanh": nn.Tanh}
    pools = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
    if activation not in acts:
        raise ValueError(f"activation must be one of {', '.join(acts)}, got {activation!r}")
    if pool not in pools:
        raise ValueError(f"pool must be one of {', '.join(pools)}, got {pool!r}")
    act, pool_layer = acts[activation], pools[pool]
    features = nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2), act(), pool_layer(2),
        nn.Conv2d(6, 16, 5), act(), pool_layer(2),
    )  # fmt: skip
    flat = _flat_size("lenet5", features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(),
        nn.Linear(flat, 120), act(), nn.Linear(120, 84), act(), _drop(dropout), nn.Linear(84, num_classes),
    )  # fmt: skip


@register_model("alexnet")
def alexnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    widths: Sequence[int] = (24, 64, 96, 96, 64),
    hidden: int = 256,
) -> nn.Module:
    """AlexNet (Krizhevsky et al. 2012) for small images: the 5-conv / 3-overlapping-max-pool
    pattern with widths ~1/4 of 96-256-384-384-256, and a stride-1 5x5 first conv instead of
    11x11/4 (which would erase a 28x28 image). Dropout before both hidden FC layers, as in the paper."""
    w = _check_widths("widths", widths, length=5)
    _check_positive("hidden", hidden)
    features = nn.Sequential(
        nn.Conv2d(in_channels, w[0], 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(w[0], w[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(w[1], w[2], 3, padding=1), nn.ReLU(),
        nn.Conv2d(w[2], w[3], 3, padding=1), nn.ReLU(),
        nn.Conv2d(w[3], w[4], 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )  # fmt: skip
    flat = _flat_size("alexnet", features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(),
        _drop(dropout), nn.Linear(flat, hidden), nn.ReLU(),
        _drop(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )  # fmt: skip


@register_model("vgg")
def vgg(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    config: Sequence[int | str] = (32, 32, "M", 64, 64, "M", 128, "M"),
    batch_norm: bool = True,
    hidden: int = 256,
) -> nn.Module:
    """VGG (Simonyan & Zisserman 2014) from a torchvision-style config: ints are 3x3 conv widths,
    "M" a 2x2 max-pool. One hidden FC layer instead of two 4096-wide ones."""
    _check_positive("hidden", hidden)
    layers: list[nn.Module] = []
    cin = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        _check_positive("config entries (other than 'M')", item)
        assert isinstance(item, int)
        if batch_norm:
            layers += list(_conv_bn_relu(cin, item))
        else:
            layers += [nn.Conv2d(cin, item, 3, padding=1), nn.ReLU()]
        cin = item
    features = nn.Sequential(*layers)
    flat = _flat_size("vgg", features, in_channels, image_size)
    return nn.Sequential(
        features, nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), _drop(dropout), nn.Linear(hidden, num_classes)
    )


# ------------------------------------------------------------------------ global-pool networks


class _BasicBlock(nn.Module):
    """ResNet basic block; a 1x1-conv+BN projection shortcut when the shape changes (option B)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv_bn_relu(cin, cout, stride=stride),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


@register_model("resnet")
def resnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    layers: Sequence[int] = (2, 2, 2),
    widths: Sequence[int] = (32, 64, 128),
) -> nn.Module:
    """ResNet (He et al. 2015), CIFAR-style: a 3x3 stem without max-pool, one stage per width,
    stride 2 at the start of every stage but the first."""
    layers = _check_widths("layers", layers)
    widths = _check_widths("widths", widths, length=len(layers))
    blocks: list[nn.Module] = [_conv_bn_relu(in_channels, widths[0])]
    cin = widths[0]
    for stage, (n, w) in enumerate(zip(layers, widths)):
        for i in range(n):
            blocks.append(_BasicBlock(cin, w, stride=2 if stage > 0 and i == 0 else 1))
            cin = w
    return _gap_net("resnet", nn.Sequential(*blocks), in_channels, num_classes, image_size, dropout)


class _Inception(nn.Module):
    """GoogLeNet inception module: 1x1 | 1x1->3x3 | 1x1->5x5 | 3x3 max-pool->1x1, concatenated."""

    def __init__(self, cin: int, c1: int, c3r: int, c3: int, c5r: int, c5: int, cp: int) -> None:
        super().__init__()
        self.b1 = _conv_bn_relu(cin, c1, 1)
        self.b3 = nn.Sequential(_conv_bn_relu(cin, c3r, 1), _conv_bn_relu(c3r, c3, 3))
        self.b5 = nn.Sequential(_conv_bn_relu(cin, c5r, 1), _conv_bn_relu(c5r, c5, 5))
        self.bp = nn.Sequential(nn.MaxPool2d(3, 1, padding=1), _conv_bn_relu(cin, cp, 1))
        self.out_channels = c1 + c3 + c5 + cp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], dim=1)


# GoogLeNet's 3a, 3b, 4a branch widths (c1, c3r, c3, c5r, c5, cp), divided by 4.
_INCEPTION_MODULES = ((16, 24, 32, 4, 8, 8), (32, 32, 48, 8, 24, 16), (48, 24, 52, 4, 12, 16))


@register_model("inception")
def inception(
    in_channels: int, num_classes: int, image_size: int, dropout: float = 0.0, stem_width: int = 32
) -> nn.Module:
    """GoogLeNet (Szegedy et al. 2014) shrunk: 3x3 stem, inception 3a, 3b, max-pool /2, 4a (at 1/4
    width, with BN as in Inception-v2), global average pool. No auxiliary classifiers."""
    _check_positive("stem_width", stem_width)
    stem = _conv_bn_relu(in_channels, stem_width)
    m3a = _Inception(stem_width, *_INCEPTION_MODULES[0])
    m3b = _Inception(m3a.out_channels, *_INCEPTION_MODULES[1])
    m4a = _Inception(m3b.out_channels, *_INCEPTION_MODULES[2])
    features = nn.Sequential(stem, m3a, m3b, nn.MaxPool2d(3, 2, padding=1), m4a)
    return _gap_net("inception", features, in_channels, num_classes, image_size, dropout)


class _DenseLayer(nn.Module):
    """DenseNet-B bottleneck layer: BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), output concatenated."""

    def __init__(self, cin: int, growth_rate: int) -> None:
        super().__init__()
        width = 4 * growth_rate  # the paper's bottleneck width
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(), nn.Conv2d(cin, width, 1, bias=False),
            nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, growth_rate, 3, padding=1, bias=False),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


@register_model("densenet")
def densenet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    dropout: float = 0.0,
    growth_rate: int = 12,
    block_config: Sequence[int] = (4, 4, 4),
) -> nn.Module:
    """DenseNet-BC (Huang et al. 2017), CIFAR-style: 3x3 stem of 2k channels, dense blocks joined
    by BN-ReLU-conv1x1-avgpool2 transitions with compression 0.5, final BN-ReLU, global pool."""
    _check_positive("growth_rate", growth_rate)
    block_config = _check_widths("block_config", block_config)
    channels = 2 * growth_rate
    layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)]
    for b, n in enumerate(block_config):
        for _ in range(n):
            layers.append(_DenseLayer(channels, growth_rate))
            channels += growth_rate
        if b < len(block_config) - 1:
            out = channels // 2
            layers.append(nn.Sequential(
                nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 1, bias=False), nn.AvgPool2d(2)
            ))  # fmt: skip
            channels = out
    layers += [nn.BatchNorm2d(channels), nn.ReLU()]  # pre-activation blocks leave the last output un-normalized
    return _gap_net("densenet", nn.Sequential(*layers), in_channels, num_classes, image_size, dropout)
