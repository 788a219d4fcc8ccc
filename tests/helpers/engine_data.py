"""Tiny learnable tensor data and models for the engine's tests (tests/test_engine.py,
tests/test_distributed.py's worker, the resume script): real training in seconds."""

from __future__ import annotations

import torch

from cnnlab.config import FitParams, RuntimeParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.models.classifier import ModelSpec, build_classifier

FAST = dict(epochs=4, batch_size=16, early_stopping_patience=None, precision="fp32", channels_last=False)


def fit_params(**kw) -> FitParams:
    """FitParams from flat keys: the runtime's (precision, channels_last, device, tf32) go to ``runtime``."""
    runtime = {k: kw.pop(k) for k in list(kw) if k in RuntimeParams.model_fields}
    return FitParams(**kw, runtime=RuntimeParams(**runtime))


def data(n_per_class: int = 24, classes: int = 3, size: int = 12, seed: int = 0, copies: int = 0) -> tuple[TrainSet, TensorSet]:
    """Class c = a bright square at a class-specific place plus noise: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.arange(classes).repeat_interleave(n)
        imgs = torch.randint(0, 60, (len(labels), 1, size, size), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            imgs[i, 0, 2 + 3 * c: 5 + 3 * c, 2:6] = 250
        return imgs, labels

    x, y = make(n_per_class)
    n = len(y)
    versions = [[i] for i in range(n)]
    if copies:
        extra = [x.roll(1, dims=3) for _ in range(copies)]
        for k in range(copies):
            for i in range(n):
                versions[i].append(n * (k + 1) + i)
        x, y = torch.cat([x, *extra]), torch.cat([y] * (copies + 1))
    vx, vy = make(n_per_class // 2)
    return TrainSet(x, y, torch.tensor(versions)), TensorSet(vx, vy)


def model(seed: int = 0, dropout: float = 0.0, arch: str = "tinyvgg"):
    torch.manual_seed(seed)
    spec = ModelSpec(kind="scratch", arch=arch, classes=["a", "b", "c"], mode="L", image_size=12, mean=[0.2], std=[0.3],
                     kwargs={"dropout": dropout, **({"hidden_units": 4} if arch == "tinyvgg" else {})})
    return build_classifier(spec)
