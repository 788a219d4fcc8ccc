"""ONNX export parity: every zoo architecture and every offline backbone, grey and RGB, exports to a
graph that answers like the PyTorch model (`cnnlab.serving.onnx_export`).

Why: a served graph that is wrong for one network (an op the TorchScript exporter translates its own
way, BatchNorm statistics dropped, a batch size baked into the trace) would serve wrong probabilities
without an error; `check_parity` is the guard, so it runs here on every network a spec can name, and
a last test shows that it does fail when the two models differ.

The weights are random but chosen to matter: BatchNorm running statistics are those of a batch of
images (not the defaults 0 and 1, so a graph ignoring them fails, which each case checks), and the last
linear layer is rescaled so each logit varies between images by half a unit (random init leaves the
probabilities almost uniform and almost input-independent, where nearly any graph would pass). Not
more: a random resnet50's 16 chaotic blocks amplify float32 rounding, in either runtime, to ~3e-5 of
probability at this spread, up to 1.3e-4 at a spread of 2 (trained EfficientNet-Lite0: 1e-6 to 1e-5).
Images: real encoded photos prepared as a request is, plus noise; batches of 1 and 5 (the export
example has 2), so the batch axis must really be dynamic.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import matplotlib.cbook
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import cnnlab.models.backbones as bb
from cnnlab.data.images import load_image_bytes
from cnnlab.data.preprocess import prepare_array
from cnnlab.models.classifier import Classifier, ModelSpec, build_classifier
from cnnlab.models.zoo import list_models
from cnnlab.serving.onnx_export import TOLERANCE, ParityError, check_parity, export_onnx

# GreyToRGB's `if x.shape[1] == 1` is fixed by the trace: harmless, the graph's channel axis is static.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor to a Python boolean:torch.jit.TracerWarning:cnnlab.models.backbones"
)

CLASSES = ["a", "b", "c", "d", "e"]
PHOTOS = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")  # JPEG, RGBA PNGs


@functools.cache
def photos(mode: str, size: int) -> np.ndarray:
    """(3, C, size, size) uint8: matplotlib's sample photos, decoded and prepared like a request."""
    arrays = []
    for name in PHOTOS:
        data = matplotlib.cbook.get_sample_data(name, asfileobj=True).read()
        arrays.append(prepare_array(load_image_bytes(data, max_pixels=40_000_000), mode=mode, size=size))
    return np.stack(arrays)


def noise(n: int, spec: ModelSpec, seed: int) -> np.ndarray:
    shape = (n, spec.in_channels, spec.image_size, spec.image_size)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def probabilities(model: nn.Module, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.from_numpy(images)).softmax(dim=1)


def weights_that_matter(model: Classifier, spec: ModelSpec) -> Classifier:
    """Running statistics of a batch of images, and logits spread over half a unit (see the top)."""
    images = torch.from_numpy(np.concatenate([photos(spec.mode, spec.image_size), noise(13, spec, seed=1)]))
    for bn in batch_norms(model):
        bn.momentum = None  # cumulative average: after one pass, exactly that batch's statistics
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    logits: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, out: logits.append(out))
    with torch.no_grad():
        model.train()(images)
        model.eval()(images)
        hook.remove()
        z = logits[-1]
        scale = 0.5 / z.std(dim=0).mean()
        head.weight.mul_(scale)
        head.bias.copy_(head.bias * scale - z.mean(dim=0) * scale)  # each class's logit centred on 0
    return model.eval()


def assert_exports_with_parity(model: Classifier, spec: ModelSpec, tmp_path: Path) -> None:
    model = weights_that_matter(model, spec)
    one, five = photos(spec.mode, spec.image_size)[:1], np.concatenate([photos(spec.mode, spec.image_size)[1:],
                                                                        noise(3, spec, seed=2)])
    expected = probabilities(model, np.concatenate([one, five]))
    assert (expected.amax(dim=0) - expected.amin(dim=0)).max() > 0.05, "the test model's answer ignores the image"
    if batch_norms(model):  # the running statistics change the answer by far more than the tolerance
        default_stats = copy.deepcopy(model)
        for bn in batch_norms(default_stats):
            bn.reset_running_stats()
        assert (probabilities(default_stats, np.concatenate([one, five])) - expected).abs().max() > 100 * TOLERANCE

    graph = tmp_path / "model.onnx"
    export_onnx(model, spec, graph)
    parity = check_parity(model, graph, [one, five], name=f"{spec.arch} {spec.mode} {spec.image_size} px")
    assert parity.images == 6
    assert parity.max_abs_diff <= TOLERANCE
    graph.unlink()  # up to 550 MB (vgg16): not worth keeping among pytest's last three runs


@pytest.mark.parametrize("mode,size", [("L", 28), ("RGB", 64)])
@pytest.mark.parametrize("arch", list_models())
def test_zoo_architecture_exports_with_parity(arch: str, mode: str, size: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    channels = 1 if mode == "L" else 3
    spec = ModelSpec(kind="scratch", arch=arch, classes=CLASSES, mode=mode, image_size=size,
                     mean=[0.3] * channels, std=[0.35] * channels)
    assert_exports_with_parity(build_classifier(spec), spec, tmp_path)


@pytest.mark.parametrize("mode", ["L", "RGB"])
@pytest.mark.parametrize("arch", bb.list_backbones())
def test_backbone_exports_with_parity(arch: str, mode: str, tmp_path: Path) -> None:
    """Random init (the "pretrained" kind builds with weights=None, as `load_classifier` does);
    64 px, where vgg16's 7x7 adaptive pool averages overlapping windows of a 2x2 map."""
    torch.manual_seed(0)
    if mode == "L":  # one channel, normalized, then repeated to three inside the net
        mean, std = [0.5], [0.5]
    elif arch == "efficientnet_lite0":  # an RGB spec must normalize like its backbone
        mean, std = [0.5] * 3, [0.5] * 3
    else:
        mean, std = list(bb.IMAGENET_MEAN), list(bb.IMAGENET_STD)
    spec = ModelSpec(kind="pretrained", arch=arch, classes=CLASSES, mode=mode, image_size=64, mean=mean, std=std)
    assert_exports_with_parity(build_classifier(spec), spec, tmp_path)


def tinyvgg(tmp_path: Path) -> tuple[Classifier, ModelSpec, Path]:
    torch.manual_seed(0)
    spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=CLASSES, mode="L", image_size=28, mean=[0.3], std=[0.35])
    model = weights_that_matter(build_classifier(spec), spec)
    export_onnx(model, spec, tmp_path / "model.onnx")
    return model, spec, tmp_path / "model.onnx"


def test_parity_check_fails_when_the_graph_differs(tmp_path: Path) -> None:
    model, spec, graph = tinyvgg(tmp_path)
    batches = [photos("L", 28)[:1], noise(5, spec, seed=3)]
    assert check_parity(model, graph, batches, name="tinyvgg").images == 6  # the same weights pass
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias[0] += 1.0  # one weight changed after the export
    with pytest.raises(ParityError, match=r"^tinyvgg: .* differ .* on test image 0 \(allowed: 0\.0001\)"):
        check_parity(model, graph, batches, name="tinyvgg")


def test_graph_has_named_uint8_input_and_dynamic_batch_axis(tmp_path: Path) -> None:
    _, spec, graph = tinyvgg(tmp_path)
    proto = onnx.load(str(graph))
    (image,), (logits,) = proto.graph.input, proto.graph.output
    assert (image.name, logits.name) == ("image", "logits")
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    image_dims, logit_dims = image.type.tensor_type.shape.dim, logits.type.tensor_type.shape.dim
    assert image_dims[0].dim_param == logit_dims[0].dim_param == "batch"  # symbolic, no fixed value
    assert not image_dims[0].HasField("dim_value") and not logit_dims[0].HasField("dim_value")
    assert [d.dim_value for d in image_dims[1:]] == [spec.in_channels, spec.image_size, spec.image_size]  # fixed
    assert logit_dims[1].dim_value == len(CLASSES)
