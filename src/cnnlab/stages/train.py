"""Stage `train@<variant>`: one from-scratch variant end to end (data, model, fit, outputs, MLflow run)."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import torch

from cnnlab.config import AugmentParams, TrainParams
from cnnlab.training import distributed
from cnnlab.data.tensors import load_split, load_train, split_classes, split_mode
from cnnlab.training.engine import fit, load_checkpoint
from cnnlab.training.hardware import resolve_runtime
from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.models.zoo import init_weights
from cnnlab.training.outputs import TrainOutputs, record_variant
from cnnlab.files import files_digest
from cnnlab.tracking.runs import params_hash, tracked_run


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images, in [0, 1] units, for input normalization."""
    x = images.float().div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    return x.mean(1).tolist(), x.std(1).clamp(min=1e-3).tolist()


def train_variant(
    *,
    variant: str,
    split_dir: Path,
    augmented_dir: Path | None,
    on_the_fly: bool,
    dropout: float,
    cfg: TrainParams,
    seed: int,
    experiment: str,
    logged_params: dict[str, Any],
    out: TrainOutputs,
) -> dict[str, Any]:
    """Train one variant end to end; returns its metrics (also written to ``out.metrics``).

    Under torchrun every rank trains (`cnnlab.training.distributed`) and rank 0 alone opens the MLflow run
    and writes the outputs; the other ranks return an empty dict."""
    rt = resolve_runtime(device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last, tf32=cfg.tf32)
    world, rt = distributed.join(rt, f"train@{variant}", cfg.batch_size)
    logged_params = {**logged_params, **rt.params(), "world_size": world.size}
    torch.manual_seed(seed)
    mode, classes = split_mode(split_dir), split_classes(split_dir)
    train = load_train(split_dir, None if on_the_fly else augmented_dir, mode=mode, size=cfg.image_size)
    val = load_split(split_dir, "val", mode=mode, size=cfg.image_size)
    augment = None
    if on_the_fly and augmented_dir is not None:
        from cnnlab.data.augment import build_policy  # torchvision's transforms: ~2 s to import

        policy = AugmentParams(**json.loads((augmented_dir / "policy.json").read_text()))
        augment = build_policy(policy)
    mean, std = channel_stats(train.images[train.versions[:, 0]])
    spec = ModelSpec(kind="zoo", arch=cfg.arch, classes=classes, mode=mode, image_size=cfg.image_size,
                     mean=mean, std=std, kwargs={**cfg.arch_kwargs, "dropout": dropout})
    model = build_classifier(spec)
    init_weights(model.net, cfg.init)

    manifests = [split_dir / "train.csv", split_dir / "val.csv"]
    if augmented_dir is not None:
        manifests.append(augmented_dir / "train.csv")
    fingerprint = params_hash({"params": logged_params, "data": files_digest(*manifests), "runtime": rt.key})
    previous = load_checkpoint(out.checkpoint, fingerprint)
    resume_run = previous["extra"].get("run_id") if previous else None

    tracking = tracked_run(experiment=experiment, run_name=variant, params=logged_params, run_id=resume_run,
                           tags={"variant": variant, "kind": "scratch", "stage": f"train@{variant}", **rt.tags()})
    with tracking if world.main else nullcontext() as run:
        result = fit(
            model, train, val, cfg, seed=seed, runtime=rt, checkpoint=out.checkpoint, fingerprint=fingerprint,
            extra={"run_id": run.info.run_id} if run else None, augment=augment, world=world,
            on_epoch=(lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                     step=int(row["epoch"]))) if run else None,
        )
        if run is None:  # a rank other than 0: rank 0 writes everything
            distributed.close(world)
            return {}
        metrics, timing, run_info = record_variant(
            run, variant=variant, model=model, spec=spec, result=result, out=out,
            experiment=experiment, title=f"{variant}: {cfg.arch}, dropout {dropout:g}")
    out.checkpoint.unlink(missing_ok=True)
    distributed.close(world)
    return {**metrics, **timing, **run_info, "spec": asdict(spec)}
