"""A tiny real classifier, trained for a moment, logged and registered: what a served model is.

Shared by the tests that need a model other processes can load (`mlflow models serve`,
`python -m cnnlab predict`), so it uses a built-in architecture (kind "scratch", tinyvgg): a kind
registered only inside a test module would not exist in those processes.
"""

from __future__ import annotations

import io
from pathlib import Path

import mlflow
import numpy as np
import torch
from PIL import Image

from cnnlab.data.preprocess import prepare
from cnnlab.models.classifier import ModelSpec, build_classifier, save_classifier
from cnnlab.serving.pyfunc import log_classifier

CLASSES = ["dark", "mid", "bright"]
SPEC = ModelSpec(
    kind="scratch", arch="tinyvgg", classes=CLASSES, mode="RGB", image_size=16,
    mean=[0.5] * 3, std=[0.25] * 3, kwargs={"hidden_units": 4},
)


def encode(mode: str, size: tuple[int, int], fmt: str, seed: int, level: int | None = None) -> bytes:
    """An encoded image of noise around ``level`` (random when None), in ``mode`` and ``fmt``."""
    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,), "CMYK": (4,)}[mode]
    centre = int(rng.integers(0, 256)) if level is None else level
    pixels = np.clip(centre + rng.normal(0, 30, (size[1], size[0], *channels)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


def train_tiny(folder: Path, *, steps: int = 40) -> ModelSpec:
    """Train SPEC for a few steps to tell dark / mid / bright images apart; save it in ``folder``."""
    torch.manual_seed(0)
    model = build_classifier(SPEC)
    levels = {0: 40, 1: 128, 2: 215}
    images, labels = [], []
    for i in range(60):
        label = i % 3
        with Image.open(io.BytesIO(encode("RGB", (20, 20), "PNG", i, levels[label]))) as im:
            images.append(prepare(im, mode=SPEC.mode, size=SPEC.image_size))
        labels.append(label)
    x, y = torch.stack(images), torch.tensor(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    save_classifier(model.eval(), SPEC, folder)
    return SPEC


def register_tiny(root: Path, tracking_uri: str, name: str, alias: str = "champion") -> str:
    """Train, log into ``tracking_uri`` and register there; returns ``models:/name@alias``.

    Store and experiment are set explicitly: a URI that an earlier test gave
    `mlflow.set_tracking_uri` outranks the MLFLOW_TRACKING_URI variable (all a served subprocess
    sees), and an experiment it made active may not exist in this store.
    """
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("tiny")
    train_tiny(root / "tiny_model")
    with mlflow.start_run(run_name="tiny"):
        examples = [encode("RGB", (20, 20), "PNG", 0), encode("L", (9, 30), "JPEG", 1)]
        info = log_classifier(root / "tiny_model", example_images=examples)
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient().set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"
