"""Stage `fine_tune@<variant>`: a feature_extract variant's model (backbone + its trained head, never
a random head) with the top N backbone blocks unfrozen, trained at discriminative learning rates.

Why each rule: a random head would send large gradients into pretrained blocks and wreck them,
so fine-tuning starts from the trained head; the head learns fastest, the top blocks slower and
lower blocks slower still (each block down gets ``block_lr_decay`` times the rate above it);
BatchNorm layers in frozen blocks stay in eval mode so their ImageNet statistics are not
overwritten by small batches of a different domain.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from cnnlab.training import distributed
from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, load_train
from cnnlab.training.engine import fit, load_checkpoint
from cnnlab.training.hardware import resolve_runtime
from cnnlab.models.backbones import create_backbone
from cnnlab.models.classifier import Classifier, load_classifier
from cnnlab.training.outputs import TrainOutputs, record_variant
from cnnlab.training.prefix_cache import FromPrefix, prefix_cacheable, prefix_outputs, swap_prefix
from cnnlab.files import files_digest
from cnnlab.tracking.runs import params_hash, tracked_run

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass(frozen=True)
class FineTuneConfig:
    unfreeze_blocks: int  # top N of the backbone's blocks
    block_lr_decay: float  # lr of block k from the top = lr * decay ** k (head: lr)
    unfreeze_every: int  # gradual unfreezing: one more block every this many epochs; 0 = all at once
    train_bn: bool = False  # False: every BatchNorm keeps its ImageNet statistics (the lesson's advice)
    cache_frozen: bool = True  # compute the frozen blocks' output once per image, not once per epoch


def active_blocks(top: list[str], epoch: int, every: int) -> list[str]:
    """Blocks trainable in ``epoch`` (1-based): all of ``top`` at once, or one more every ``every``."""
    if every <= 0:
        return top
    return top[: min(len(top), 1 + (epoch - 1) // every)]


def param_groups(clf: Classifier, top: list[str], *, lr: float, decay: float) -> list[dict]:
    """Head at ``lr``; ``top[k]`` (k = 0 is the block nearest the head) at ``lr * decay ** (k + 1)``."""
    groups = [{"params": list(clf.net.head.parameters()), "lr": lr, "name": "head"}]
    for k, name in enumerate(top):
        params = list(clf.net.features.get_submodule(name).parameters())
        if params:
            groups.append({"params": params, "lr": lr * decay ** (k + 1), "name": name})
    return groups


def make_before_epoch(top: list[str], every: int, train_bn: bool):
    """Freeze all but this epoch's active blocks; BatchNorm layers of frozen blocks (all of them
    unless ``train_bn``) stay in eval mode."""

    def before_epoch(epoch: int, model: nn.Module) -> None:
        features = model.net.features
        active = set(active_blocks(top, epoch, every))
        for p in features.parameters():
            p.requires_grad_(False)
        for name in top:
            block = features.get_submodule(name)
            for p in block.parameters():
                p.requires_grad_(name in active)
        for module_name, module in features.named_modules():
            in_active = any(module_name == a or module_name.startswith(a + ".") for a in active)
            if isinstance(module, _BN) and not (train_bn and in_active):
                module.eval()

    return before_epoch


def fine_tune(
    *, variant: str, split_dir: Path, augmented_dir: Path | None, start_model: Path, ft: FineTuneConfig, cfg: TrainParams,
    seed: int, experiment: str, logged_params: dict[str, Any], out: TrainOutputs,
) -> dict[str, Any]:
    """Unfreeze the top blocks of a feature_extract model (``start_model``) and train; one MLflow run.
    Under torchrun rank 0 alone opens the run and writes the outputs (the others return {})."""
    rt = resolve_runtime(device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last, tf32=cfg.tf32)
    world, rt = distributed.join(rt, f"fine_tune@{variant}", cfg.batch_size)
    logged_params = {**logged_params, **rt.params(), "world_size": world.size}
    torch.manual_seed(seed)
    clf, spec = load_classifier(start_model)
    if spec.kind != "backbone":
        raise ValueError(f"{start_model}: fine_tune starts from a backbone model (feature_extract), got {spec.kind!r}")
    _, info = create_backbone(spec.arch, weights=None)  # block names only
    if not 1 <= ft.unfreeze_blocks <= len(info.blocks):
        raise ValueError(f"fine_tune.unfreeze_blocks = {ft.unfreeze_blocks}: {spec.arch} has "
                         f"{len(info.blocks)} blocks ({', '.join(info.blocks)})")
    top = list(reversed(info.blocks))[: ft.unfreeze_blocks]  # nearest the head first
    frozen = [b for b in info.blocks if b not in top]  # input side first
    train = load_train(split_dir, augmented_dir, mode=spec.mode, size=spec.image_size)
    val = load_split(split_dir, "val", mode=spec.mode, size=spec.image_size)

    why_not = (prefix_cacheable(clf, frozen, val.images[:8], rt=rt, images=len(train) + len(val))
               if ft.cache_frozen else "cache_frozen is off")
    if why_not is None:
        if world.main:
            print(f"fine_tune: {', '.join(frozen)} stay frozen all run; their output is computed once per image",
                  file=sys.stderr)
        train = TrainSet(prefix_outputs(clf, frozen[-1], train.images, rt=rt), train.labels, train.versions)
        val = TensorSet(prefix_outputs(clf, frozen[-1], val.images, rt=rt), val.labels)
    elif frozen and world.main:
        print(f"fine_tune: the frozen blocks run every epoch ({why_not})", file=sys.stderr)

    manifests = [split_dir / "train.csv", split_dir / "val.csv", start_model / "weights.pt"]
    if augmented_dir is not None:
        manifests.append(augmented_dir / "train.csv")
    fingerprint = params_hash({"params": logged_params, "data": files_digest(*manifests), "runtime": rt.key,
                               "from_prefix": why_not is None})
    previous = load_checkpoint(out.checkpoint, fingerprint)
    tracking = tracked_run(experiment=experiment, run_name=variant, params=logged_params,
                           tags={"variant": variant, "kind": "fine_tune", "stage": f"fine_tune@{variant}", **rt.tags()},
                           run_id=previous["extra"].get("run_id") if previous else None)
    with tracking if world.main else nullcontext() as run:
        with swap_prefix(clf, frozen if why_not is None else []):
            result = fit(
                FromPrefix(clf) if why_not is None else clf, train, val, cfg, seed=seed, runtime=rt,
                checkpoint=out.checkpoint, fingerprint=fingerprint, extra={"run_id": run.info.run_id} if run else None,
                param_groups=param_groups(clf, top, lr=cfg.lr, decay=ft.block_lr_decay),
                before_epoch=make_before_epoch(top, ft.unfreeze_every, ft.train_bn), world=world,
                on_epoch=(lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                         step=int(row["epoch"]))) if run else None,
            )
        if run is None:  # a rank other than 0: rank 0 writes everything
            distributed.close(world)
            return {}
        # The trained modules live inside clf and the frozen ones are back: clf is the whole model.
        for p in clf.parameters():
            p.requires_grad_(True)
        metrics, timing, run_info = record_variant(
            run, variant=variant, model=clf, spec=spec, result=result, out=out,
            experiment=experiment, title=f"{variant}: {spec.arch}, top {ft.unfreeze_blocks} blocks")
    out.checkpoint.unlink(missing_ok=True)
    distributed.close(world)
    return {**metrics, **timing, **run_info, "unfrozen": top}
