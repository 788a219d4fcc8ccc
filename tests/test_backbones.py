"""Pretrained backbones: real offline ImageNet weights, safe loading, and never touching the network."""

from __future__ import annotations

import hashlib
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

import cnnlab.models.backbones as bb
from cnnlab.models.classifier import ModelSpec, build_classifier, build_pretrained_classifier, load_classifier, save_classifier

MILITARY_UNIFORM = 652  # ImageNet class of the Grace Hopper portrait


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Every test: offline flag, an empty private hub cache, and a download that fails loudly."""
    monkeypatch.setenv("CNNLAB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args: object, **kwargs: object) -> None:
        raise AssertionError("a test tried to download weights")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def _grace_hopper() -> torch.Tensor:
    """(1, 3, 224, 224) normalized like EfficientNet-Lite: shorter side 224, centre crop, 0.5/0.5."""
    img = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    img = TF.center_crop(TF.resize(img, 224), 224)
    return ((TF.pil_to_tensor(img).float() / 255.0 - 0.5) / 0.5).unsqueeze(0)


@pytest.fixture(scope="module")
def lite0_imagenet() -> torch.nn.Module:
    return bb.imagenet_model("efficientnet_lite0")[0]


def test_real_weights_recognise_grace_hopper(lite0_imagenet: torch.nn.Module) -> None:
    x = _grace_hopper()
    with torch.no_grad():
        probs = lite0_imagenet(x).softmax(1)[0]
    top5 = probs.topk(5).indices.tolist()
    assert top5[0] == MILITARY_UNIFORM, top5  # observed p = 0.32; runner-up 0.08
    assert probs[MILITARY_UNIFORM] > 0.2

    torch.manual_seed(0)
    random_model, _ = bb.imagenet_model("efficientnet_lite0", weights=None)
    with torch.no_grad():
        random_probs = random_model(x).softmax(1)[0]
    # Untrained: no confident answer, so the check above really depends on the weights.
    assert random_probs.max() < 0.2  # observed 0.06
    assert random_probs[MILITARY_UNIFORM] < 0.05


def test_features_shape_deterministic_and_from_the_package(lite0_imagenet: torch.nn.Module) -> None:
    features, info = bb.create_backbone("efficientnet_lite0")
    assert not features.training
    assert info.feature_dim == 1280 and info.mean == info.std == (0.5, 0.5, 0.5) and info.input_size == 224
    x = torch.randn(3, 3, 96, 96)
    with torch.no_grad():
        a, b = features(x), features(x)
    assert a.shape == (3, 1280)
    assert torch.equal(a, b)
    # The backbone carries the same pretrained tensors as the full ImageNet model.
    assert torch.equal(features.conv_stem.weight, lite0_imagenet.conv_stem.weight)
    assert torch.equal(features.blocks[6][0].conv_pwl.weight, lite0_imagenet.blocks[6][0].conv_pwl.weight)


def test_in_order_mapping_refuses_a_shape_mismatch() -> None:
    src = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    assert set(bb._map_in_order(src, {"x": torch.ones(2, 3), "y": torch.ones(4)})) == {"x", "y"}
    with pytest.raises(ValueError, match=r"b \(4,\) vs y \(5,\)"):
        bb._map_in_order(src, {"x": torch.ones(2, 3), "y": torch.ones(5)})
    with pytest.raises(ValueError, match="2 tensors in the file, model has 1"):
        bb._map_in_order(src, {"x": torch.ones(2, 3)})


def test_package_file_hash_is_pinned() -> None:
    path = bb._lite0_package_file()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == bb.EFFICIENTNET_LITE0_SHA256


@pytest.mark.parametrize(
    ("name", "dim"),
    [
        ("resnet18", 512),
        ("resnet50", 2048),
        ("vgg16", 4096),
        ("mobilenet_v3_large", 1280),
        ("efficientnet_b0", 1280),
        ("densenet121", 1024),
        ("efficientnet_lite0", 1280),
    ],
)
def test_random_init_backbones_dims_and_blocks(name: str, dim: int) -> None:
    model, info = bb.create_backbone(name, weights=None)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, dim) == (1, info.feature_dim)
    # Unfreezing every listed block must unfreeze the whole backbone: no parameter left out.
    covered = {id(p) for b in info.blocks for p in model.get_submodule(b).parameters()}
    assert covered == {id(p) for p in model.parameters()}
    assert len(info.blocks) == len(set(info.blocks))


def test_offline_without_cache_names_all_options(offline: Path) -> None:
    with pytest.raises(bb.WeightsUnavailableError) as err:
        bb.create_backbone("resnet18")
    msg = str(err.value)
    assert "weights='/path/to/file.pth'" in msg
    assert str(offline / "resnet18-f37072fd.pth") in msg
    assert "go online" in msg and "CNNLAB_OFFLINE" in msg


def test_cached_torchvision_file_has_its_hash_prefix_checked(offline: Path) -> None:
    import torchvision

    offline.mkdir(parents=True)
    # Found by torchvision's file name, but its content does not hash to f37072fd...: refused.
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), offline / "resnet18-f37072fd.pth")
    with pytest.raises(ValueError, match="does not start with f37072fd"):
        bb.create_backbone("resnet18")


def test_explicit_weights_file_is_loaded(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(1)
    saved = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "x.pth"
    torch.save(saved, path)
    model, _ = bb.create_backbone("resnet18", weights=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
    # A features-only file (no fc) is accepted as well: it is what a saved backbone holds.
    headless = tmp_path / "headless.pth"
    torch.save(model.state_dict(), headless)
    again, _ = bb.create_backbone("resnet18", weights=str(headless))
    assert torch.equal(again.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])

    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.load_state_dict_safely(path, sha256=digest).keys() == saved.keys()
    with pytest.raises(ValueError, match=f"expected {'0' * 64}, actual {digest}"):
        bb.load_state_dict_safely(path, sha256="0" * 64)

    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match="weights do not fit"):
        bb.create_backbone("resnet18", weights=str(wrong))
    with pytest.raises(ValueError, match="does not exist"):
        bb.create_backbone("resnet18", weights=str(tmp_path / "missing.pth"))


def test_safetensors_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.arange(6.0).view(2, 3)}, str(path))
    assert torch.equal(bb.load_state_dict_safely(path)["a"], torch.arange(6.0).view(2, 3))


class Payload:
    """Stands in for arbitrary pickled code."""


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"x": Payload()}, path)
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        bb.load_state_dict_safely(path)
    # Tensors-only but not a state dict: also refused, naming the file.
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="not a state dict"):
        bb.load_state_dict_safely(path)


def test_timm_without_file_and_unknown_names() -> None:
    with pytest.raises(bb.WeightsUnavailableError, match="timm:resnet18"):
        bb.create_backbone("timm:resnet18")
    model, info = bb.create_backbone("timm:resnet18", weights=None)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, info.feature_dim) == (1, 512)
    with pytest.raises(ValueError, match="unknown timm model"):
        bb.create_backbone("timm:no_such_net")
    with pytest.raises(ValueError, match="known backbones: densenet121, efficientnet_b0, efficientnet_lite0"):
        bb.create_backbone("resnet19")


def _grey_spec(**kwargs: object) -> ModelSpec:
    return ModelSpec(
        kind="pretrained",
        arch="efficientnet_lite0",
        classes=["a", "b", "c"],
        mode="L",
        image_size=64,
        mean=[0.5],
        std=[0.5],
        kwargs={"dropout": 0.2, "hidden": None, **kwargs},
    )


def test_backbone_kind_grey_end_to_end_and_reload_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_classifier(_grey_spec()).eval()
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 1, 64, 64), dtype=np.uint8))
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 3)

    save_classifier(model, _grey_spec(), tmp_path / "m")

    def no_package() -> Path:
        raise AssertionError("rebuilding a saved model must not read pretrained weights")

    monkeypatch.setattr(bb, "_lite0_package_file", no_package)
    loaded, spec = load_classifier(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x), out)
    assert spec.kind == "pretrained"


def test_pretrained_classifier_and_head_options(lite0_imagenet: torch.nn.Module) -> None:
    spec = ModelSpec(
        kind="pretrained",
        arch="efficientnet_lite0",
        classes=["a", "b"],
        mode="RGB",
        image_size=64,
        mean=[0.5] * 3,
        std=[0.5] * 3,
        kwargs={"dropout": 0.0, "hidden": 16},
    )
    model = build_pretrained_classifier(spec)
    assert torch.equal(model.net.features.conv_stem.weight, lite0_imagenet.conv_stem.weight)
    assert [m.out_features for m in model.net.head if isinstance(m, torch.nn.Linear)] == [16, 2]
    assert model.eval()(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape == (1, 2)

    with pytest.raises(ValueError, match="expects mean"):
        build_classifier(ModelSpec(**{**spec.__dict__, "mean": [0.485, 0.456, 0.406]}))
    with pytest.raises(ValueError, match="unknown kwargs"):
        build_classifier(ModelSpec(**{**spec.__dict__, "kwargs": {"dropuot": 0.1}}))
