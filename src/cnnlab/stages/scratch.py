"""Stage `scratch@<variant>`: a net from the model zoo trained from random init, on the split's
images or on those plus the augment stage's copies (`train_data`), optionally augmented afresh
every epoch (`on_the_fly`). The shared sequence is `cnnlab.stages.variant.run_variant`'s."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cnnlab.config import AugmentParams, ScratchParams
from cnnlab.data.split import resolve_image_size
from cnnlab.data.tensors import load_split, load_train, split_classes, split_mode
from cnnlab.utils.files import files_digest
from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.models.zoo import init_weights
from cnnlab.stages.variant import Finished, Plan, VariantResult, VariantRun, run_variant
from cnnlab.training.distributed import World
from cnnlab.training.engine import Hooks
from cnnlab.training.hardware import Runtime


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, for input normalization."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp(min=1e-3).tolist()


def scratch(v: VariantRun, cfg: ScratchParams, *, split_dir: Path, augmented_dir: Path) -> VariantResult | None:
    """Train variant ``v`` from scratch; None on torchrun ranks other than 0 (rank 0 writes)."""
    augmented = augmented_dir if cfg.train_data == "augmented" else None
    cfg = cfg.model_copy(update={"image_size": resolve_image_size(cfg.image_size, split_dir, "scratch")})

    def prepare(rt: Runtime, world: World) -> Plan:
        mode, classes = split_mode(split_dir), split_classes(split_dir)
        train = load_train(split_dir, None if cfg.on_the_fly else augmented, mode=mode, size=cfg.image_size)
        val = load_split(split_dir, "val", mode=mode, size=cfg.image_size)
        augment = None
        if cfg.on_the_fly:
            from cnnlab.data.augment import (
                build_policy,  # torchvision's transforms: ~2 s to import
            )

            augment = build_policy(AugmentParams(**json.loads((augmented_dir / "policy.json").read_text())))
        mean, std = channel_stats(train.images[train.versions[:, 0]])
        spec = ModelSpec(kind="scratch", arch=cfg.arch, classes=classes, mode=mode, image_size=cfg.image_size,
                         mean=mean, std=std, kwargs={**cfg.arch_kwargs, "dropout": cfg.dropout})
        model = build_classifier(spec)
        init_weights(model.net, cfg.init)
        manifests = [split_dir / "train.csv", split_dir / "val.csv", split_dir / "shards.json"]
        if augmented is not None:
            manifests += [augmented / "train.csv", augmented / "shards.json"]
        title = f"{v.name}: {cfg.arch}, dropout {cfg.dropout:g}"
        return Plan(trainee=model, train=train, val=val, cfg=cfg, runtime=rt, data=[files_digest(*manifests)],
                    hooks=Hooks(augment=augment), finish=lambda result: Finished(model, spec, title))

    return run_variant(v, cfg.runtime, prepare, batch_size=cfg.batch_size)
