"""A classifier trained on real Fashion-MNIST images, and a reference for what serving must answer.

For the served-model tests: their other checks compare the server with an in-process copy of the
same pyfunc, which a preprocessing bug shared by both would pass. The reference here does the
documented preprocessing (docs/serving.md; `cnnlab.data.preprocess`)
in its own few lines of PIL and numpy: alpha over white, the split's one-time shrink of large
images (Lanczos), RGB, shorter side resized to the model's size (bilinear, after Pillow's box
pre-reduction: `reducing_gap=3`, as the project resizes), centre crop, then scaling to
[0, 1] and the spec's mean/std, straight into the saved network's layers. Only the network itself
(`cnnlab.models.zoo`, the layers the weights belong to) comes from the project.

Training also feeds the network through this reference, so the weights do not adapt to whatever
the project's preprocessing happens to do.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from cnnlab.data.idx import FASHION_MNIST_CLASSES
from cnnlab.models import zoo
from cnnlab.models.classifier import Classifier, ModelSpec, save_classifier
from cnnlab.serving.pyfunc import log_classifier

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # params.yaml download.fashion_mnist_dir
# RGB on purpose (the split's color_mode: rgb), so a swap of colour channels on the way into the
# network changes the answer for colour uploads. Mean/std: Fashion-MNIST's pixel statistics,
# rounded (0.2860 / 0.3530 over the 60,000 training images).
SPEC = ModelSpec(
    kind="scratch", arch="tinyvgg", classes=list(FASHION_MNIST_CLASSES), mode="RGB", image_size=28,
    mean=[0.286] * 3, std=[0.353] * 3, kwargs={"hidden_units": 8},
)
MAX_SIDE = 512  # the split stage's default max_side, which the served model repeats


def read_idx(path: Path) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (the format's header: 2 zero bytes, 0x08, ndim)."""
    data = gzip.decompress(path.read_bytes())
    assert data[:3] == b"\x00\x00\x08", path
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_subset(prefix: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``per_class`` images of each class of the ``prefix`` ("train" or "t10k") split,
    in file order: (N, 28, 28) uint8 pixels and their label ids."""
    images = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(len(SPEC.classes))]))
    return images[keep], labels[keep].astype(np.int64)


def png(pixels: np.ndarray) -> bytes:
    """Grey pixels as the PNG file a client would send."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "L").save(buf, "PNG")
    return buf.getvalue()


def reference_input(data: bytes, spec: ModelSpec = SPEC, max_side: int | None = MAX_SIDE) -> torch.Tensor:
    """Encoded image -> the normalised float (C, size, size) tensor the network must be given."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if im.mode in ("RGBA", "LA"):
            white = Image.new("RGB", im.size, (255, 255, 255))
            white.paste(im.convert("RGB"), mask=im.getchannel("A"))
            im = white
        elif im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        im = im.convert(spec.mode)
    w, h = im.size
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        w, h = im.size
    size = spec.image_size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    im = im.crop((left, top, left + size, top + size))
    x = np.asarray(im, dtype=np.float32) / 255.0
    x = x[..., None] if x.ndim == 2 else x  # H, W, C
    x = (x - np.array(spec.mean, dtype=np.float32)) / np.array(spec.std, dtype=np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1).copy())


def bare_net(spec: ModelSpec) -> torch.nn.Module:
    return zoo.create_model(spec.arch, in_channels=spec.in_channels, num_classes=spec.num_classes,
                            image_size=spec.image_size, **spec.kwargs)


def reference_probabilities(model_dir: Path, images: list[bytes], max_side: int | None = MAX_SIDE) -> np.ndarray:
    """Class probabilities from a saved model folder (``spec.json`` + ``weights.pt``), computed by
    the reference preprocessing and the bare network, not by `Classifier` or `cnnlab.serving.pyfunc`."""
    spec = ModelSpec(**json.loads((model_dir / "spec.json").read_text()))
    state = torch.load(model_dir / "weights.pt", map_location="cpu", weights_only=True)
    net = bare_net(spec)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")})
    x = torch.stack([reference_input(b, spec, max_side) for b in images])
    with torch.inference_mode():
        return torch.softmax(net.eval()(x), dim=1).double().numpy()


def train_fashion(folder: Path, *, per_class: int = 100, epochs: int = 5) -> ModelSpec:
    """Train SPEC on the first ``per_class`` training images of each class; save it in ``folder``."""
    torch.manual_seed(0)
    pixels, labels = fashion_subset("train", per_class)
    x = torch.stack([reference_input(png(p)) for p in pixels])
    y = torch.from_numpy(labels)
    net = bare_net(SPEC)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.005)
    generator = torch.Generator().manual_seed(0)
    net.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
            optimizer.step()
    save_classifier(Classifier(net.eval(), SPEC.mean, SPEC.std), SPEC, folder)
    return SPEC


def register_fashion(root: Path, tracking_uri: str, name: str, alias: str = "champion") -> str:
    """Train, log into ``tracking_uri`` with the split stage's default limits, register, point
    ``alias`` at it; returns ``models:/name@alias``. Store and experiment are set explicitly, as
    in `tiny_model.register_tiny` (an earlier test's `mlflow.set_tracking_uri` would win)."""
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("fashion")
    train_fashion(root / "fashion_model")
    pixels, _ = fashion_subset("t10k", 1)
    with mlflow.start_run(run_name="fashion"):
        info = log_classifier(root / "fashion_model", example_images=[png(p) for p in pixels[:2]],
                              max_side=MAX_SIDE)
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"
