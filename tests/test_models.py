"""The from-scratch model zoo: shapes, gradients, parameter counts, dropout, errors, init, the "scratch" kind."""

import math
import re

import pytest
import torch
from torch import nn

from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.models.zoo import create_model, init_weights, list_models, register_model

EXPECTED_MODELS = [
    "alexnet", "densenet", "inception", "keras_convnet", "lenet5", "resnet", "simple_cnn", "tinyvgg", "vgg",
]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_every_architecture_sorted():
    assert list_models() == EXPECTED_MODELS


@pytest.mark.parametrize("name", EXPECTED_MODELS)
@pytest.mark.parametrize("channels,size,classes", [(1, 28, 10), (3, 64, 3)])
def test_forward_shape_finite_and_gradients_reach_every_parameter(name, channels, size, classes):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, num_classes=classes, image_size=size, dropout=0.5)
    x = torch.randn(2, channels, size, size)  # batch 2: BatchNorm in train mode needs > 1 value per channel
    out = model(x)
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.tensor([0, 1])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_other_sizes_work_in_eval_mode(name):
    model = create_model(name, in_channels=3, num_classes=2, image_size=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 2)


def test_keras_convnet_matches_the_book_count():
    # Chollet's model.summary(): 320 + 18,496 + 36,928 (convs) + 36,928 (576->64) + 650 = 93,322
    assert n_params(create_model("keras_convnet", in_channels=1, num_classes=10, image_size=28)) == 93_322


def test_tinyvgg_counts():
    model = create_model("tinyvgg", in_channels=3, num_classes=3, image_size=64, hidden_units=10)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert n_params(first_conv) == 280  # 3*3*3*10 weights + 10 biases, as in CNN Explainer
    # convs: 280 + 3 * (10*10*9 + 10) = 280 + 3 * 910 = 3,010
    # 64 -> 32 -> 16 after two pools; Linear(10*16*16 = 2,560 -> 3) = 2,560*3 + 3 = 7,683
    # total 3,010 + 7,683 = 10,693
    assert n_params(model) == 10_693


def test_lenet5_count():
    # conv1 1->6 5x5 pad 2: 6*25 + 6 = 156 (28x28 kept, pooled to 14x14)
    # conv2 6->16 5x5: 16*6*25 + 16 = 2,416 (10x10, pooled to 5x5)
    # FC 16*5*5=400 -> 120: 48,120; 120 -> 84: 10,164; 84 -> 10: 850
    # total 156 + 2,416 + 48,120 + 10,164 + 850 = 61,706
    for activation, pool in [("relu", "max"), ("tanh", "avg")]:
        model = create_model("lenet5", in_channels=1, num_classes=10, image_size=28, activation=activation, pool=pool)
        assert n_params(model) == 61_706


def test_lenet5_activation_and_pool_are_honoured():
    model = create_model("lenet5", in_channels=1, num_classes=10, image_size=28, activation="tanh", pool="avg")
    kinds = {type(m) for m in model.modules()}
    assert nn.Tanh in kinds and nn.AvgPool2d in kinds
    assert nn.ReLU not in kinds and nn.MaxPool2d not in kinds
    with pytest.raises(ValueError, match="activation"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=28, activation="gelu")


def test_resnet_uses_projection_shortcuts_only_where_shape_changes():
    model = create_model("resnet", in_channels=3, num_classes=3, image_size=32, layers=[1, 1, 1], widths=[16, 16, 32])
    one_by_one = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    # stage 1 keeps stem width and stride (identity); stage 2 only strides, stage 3 strides and widens
    assert [(m.in_channels, m.out_channels, m.stride) for m in one_by_one] == [(16, 16, (2, 2)), (16, 32, (2, 2))]


def test_model_kwargs_change_the_architecture():
    small = create_model("vgg", in_channels=1, num_classes=10, image_size=28, config=[8, "M", 16, "M"])
    no_bn = create_model("vgg", in_channels=1, num_classes=10, image_size=28, batch_norm=False)
    assert [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)] == [8, 16]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in no_bn.modules())
    narrow = create_model("densenet", in_channels=1, num_classes=10, image_size=28, growth_rate=4)
    assert n_params(narrow) < n_params(create_model("densenet", in_channels=1, num_classes=10, image_size=28))


def _two_train_forwards(name: str, dropout: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = create_model(name, in_channels=1, num_classes=10, image_size=28, dropout=dropout).train()
    x = torch.randn(4, 1, 28, 28)
    return model(x), model(x)


def test_no_dropout_means_deterministic_training_forward():
    a, b = _two_train_forwards("simple_cnn", 0.0)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["simple_cnn", "tinyvgg"])
def test_dropout_randomizes_training_forward(name):
    a, b = _two_train_forwards(name, 0.5)
    assert not torch.allclose(a, b)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000", in_channels=1, num_classes=10, image_size=28)
    assert ", ".join(EXPECTED_MODELS) in str(info.value)


def test_unknown_kwarg_is_named_with_the_accepted_ones():
    with pytest.raises(ValueError, match="'hiden_units'") as info:
        create_model("tinyvgg", in_channels=1, num_classes=10, image_size=28, hiden_units=8)
    assert "hidden_units" in str(info.value).split("accepted")[1]


@pytest.mark.parametrize("name,minimum", [("tinyvgg", 4), ("keras_convnet", 18), ("lenet5", 12), ("simple_cnn", 8)])
def test_too_small_image_names_the_minimum(name, minimum):
    with pytest.raises(ValueError, match=f"needs image_size >= {minimum}, got {minimum - 1}"):
        create_model(name, in_channels=1, num_classes=10, image_size=minimum - 1)
    create_model(name, in_channels=1, num_classes=10, image_size=minimum)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_reported_minimum_size_actually_works(name):
    """Whatever minimum a model reports for a 1-pixel image must build and run; one less must not."""
    try:
        create_model(name, in_channels=1, num_classes=2, image_size=1)
        minimum = 1
    except ValueError as exc:
        minimum = int(re.search(r"image_size >= (\d+)", str(exc)).group(1))
        with pytest.raises(ValueError):
            create_model(name, in_channels=1, num_classes=2, image_size=minimum - 1)
    model = create_model(name, in_channels=1, num_classes=2, image_size=minimum).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, minimum, minimum)).shape == (1, 2)


@pytest.mark.parametrize("bad", [{"dropout": 1.0}, {"dropout": -0.1}, {"num_classes": 0}, {"image_size": 0}])
def test_bad_common_arguments_are_rejected(bad):
    args = dict(in_channels=1, num_classes=10, image_size=28) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        create_model("tinyvgg", **args)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_model("tinyvgg")(lambda **kw: nn.Identity())
    assert list_models() == EXPECTED_MODELS


def test_kaiming_init_matches_he_std_and_resets_bn_and_linear():
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=3, num_classes=10, image_size=32)
    for m in model.modules():  # move away from the targets so the asserts below can fail
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 0.5), nn.init.constant_(m.bias, 0.5)
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            nn.init.constant_(m.bias, 0.5)
    init_weights(model, "kaiming")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    for conv in convs:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        # 864+ weights per conv: the sample std is within a few percent of the target
        assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
        if isinstance(m, nn.Linear):
            assert m.weight.std().item() == pytest.approx(0.01, rel=0.1)
            assert torch.all(m.bias == 0)


def test_kaiming_differs_from_default_and_default_changes_nothing():
    torch.manual_seed(0)
    model = create_model("simple_cnn", in_channels=3, num_classes=10, image_size=32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_weights(model, "default")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels == 32)
    default_std = conv.weight.std().item()
    init_weights(model, "kaiming")
    assert conv.weight.std().item() > 1.5 * default_std  # PyTorch default is 1/sqrt(3 fan_in), He is sqrt(2/fan_out)
    with pytest.raises(ValueError, match="unknown init scheme"):
        init_weights(model, "xavier")


def test_kaiming_init_is_deterministic_under_seed():
    def build(seed: int) -> dict[str, torch.Tensor]:
        model = create_model("resnet", in_channels=1, num_classes=10, image_size=28, layers=[1, 1, 1])
        torch.manual_seed(seed)
        init_weights(model, "kaiming")
        return model.state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_zoo_kind_builds_a_classifier_from_a_spec():
    spec = ModelSpec(
        kind="scratch", arch="tinyvgg", classes=["a", "b", "c"], mode="RGB", image_size=32,
        mean=[0.5] * 3, std=[0.5] * 3, kwargs={"dropout": 0.0, "hidden_units": 4},
    )  # fmt: skip
    model = build_classifier(spec)
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert model(x).shape == (2, 3)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert (first_conv.in_channels, first_conv.out_channels) == (3, 4)  # spec kwargs reach the builder
