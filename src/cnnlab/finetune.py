"""The `fine_tune` stage: the feature_extract model (backbone + its trained head, never a random
head) with the top N backbone blocks unfrozen, trained at discriminative learning rates.

Why each rule: a random head would send large gradients into pretrained blocks and wreck them,
so fine-tuning starts from the trained head; the head learns fastest, the top blocks slower and
lower blocks slower still (each block down gets ``block_lr_decay`` times the rate above it);
BatchNorm layers in frozen blocks stay in eval mode so their ImageNet statistics are not
overwritten by small batches of a different domain.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, load_train
from cnnlab.engine import autocast, fit, load_checkpoint
from cnnlab.hardware import Runtime, resolve_runtime
from cnnlab.models.backbones import create_backbone
from cnnlab.models.classifier import Classifier, load_classifier
from cnnlab.progress import progress
from cnnlab.tracking import files_digest, params_hash, tracked_run
from cnnlab.training import TrainOutputs, record_variant

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


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the frozen prefix's output is known."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


@torch.inference_mode()
def prefix_outputs(clf: Classifier, last_frozen: str, images: torch.Tensor, *, rt: Runtime,
                   batch_size: int = 32) -> torch.Tensor:
    """What the frozen prefix (normalization through ``last_frozen``) makes of each uint8 image,
    in eval mode: computed once, instead of once per epoch. The rest of the net is never run."""
    def stop(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        raise _Stop(output)

    handle = clf.net.features.get_submodule(last_frozen).register_forward_hook(stop)
    clf.eval().to(rt.device)
    out = []
    try:
        for start in progress(range(0, len(images), batch_size), desc=f"frozen blocks up to {last_frozen}",
                              unit="batch"):
            x = images[start:start + batch_size].to(rt.device)
            if rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with autocast(rt.device, rt.precision):
                    clf(x)
            except _Stop as done:
                out.append(done.output.cpu())
    finally:
        handle.remove()
    return torch.cat(out)


class FromPrefix(nn.Module):
    """``clf`` run from its frozen prefix's output: the prefix modules are swapped for Identity
    while this wrapper is in use (`swap_prefix`), so its state dict holds the trained part only.
    ``net`` is the classifier's own net, so param groups and `before_epoch` work on it unchanged."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.net = clf.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.features(x))


@contextmanager
def swap_prefix(clf: Classifier, frozen: list[str]) -> Iterator[None]:
    """Replace the frozen modules by Identity for the block, and put them back afterwards."""
    features = clf.net.features
    saved = {name: features.get_submodule(name) for name in frozen}
    try:
        for name in frozen:
            features.set_submodule(name, nn.Identity())
        yield
    finally:
        for name, module in saved.items():
            features.set_submodule(name, module)


# Cached prefix outputs live in memory; past this the frozen blocks run every epoch instead.
MAX_PREFIX_CACHE_BYTES = 4 << 30


def prefix_cacheable(clf: Classifier, frozen: list[str], sample: torch.Tensor, *, rt: Runtime,
                     images: int = 0) -> str | None:
    """Why the frozen prefix cannot be cached (None when it can): its output must not depend on
    train/eval mode (no dropout), running the net from it must give the whole net's logits, and
    the outputs for ``images`` images must fit in `MAX_PREFIX_CACHE_BYTES`."""
    if not frozen:
        return "no block is frozen"
    cached = prefix_outputs(clf, frozen[-1], sample, rt=rt)
    size = images * cached[0].numel() * cached.element_size()
    if size > MAX_PREFIX_CACHE_BYTES:
        return f"their outputs for {images:,} images would take {size / 2**30:.1f} GiB of memory"
    features = clf.net.features
    trained_mode = [m for name in frozen for m in features.get_submodule(name).modules()
                    if isinstance(m, (nn.Dropout, nn.Dropout2d)) or type(m).__name__ == "DropPath"]
    if any(getattr(m, "p", getattr(m, "drop_prob", 0.0)) for m in trained_mode):
        return "a frozen block has dropout, which is random in training mode"
    with torch.inference_mode():
        whole = clf.eval()(sample.to(rt.device)).float().cpu()
        with swap_prefix(clf, frozen):
            part = FromPrefix(clf).eval()(cached.to(rt.device)).float().cpu()
    if not torch.allclose(whole, part, rtol=1e-3, atol=1e-3 * max(1.0, float(whole.abs().max()))):
        return "the backbone's forward is not a chain of its blocks"
    return None


def fine_tune(
    *, variant: str, split_dir: Path, augmented_dir: Path | None, start_model: Path, ft: FineTuneConfig, cfg: TrainParams,
    seed: int, experiment: str, logged_params: dict[str, Any], out: TrainOutputs,
) -> dict[str, Any]:
    """Unfreeze the top blocks of a feature_extract model (``start_model``) and train; one MLflow run."""
    rt = resolve_runtime(device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last, tf32=cfg.tf32)
    print(f"fine_tune@{variant}: {rt.describe()}", file=sys.stderr)
    logged_params = {**logged_params, **rt.params()}
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
        print(f"fine_tune: {', '.join(frozen)} stay frozen all run; their output is computed once per image",
              file=sys.stderr)
        train = TrainSet(prefix_outputs(clf, frozen[-1], train.images, rt=rt), train.labels, train.versions)
        val = TensorSet(prefix_outputs(clf, frozen[-1], val.images, rt=rt), val.labels)
    elif frozen:
        print(f"fine_tune: the frozen blocks run every epoch ({why_not})", file=sys.stderr)

    manifests = [split_dir / "train.csv", split_dir / "val.csv", start_model / "weights.pt"]
    if augmented_dir is not None:
        manifests.append(augmented_dir / "train.csv")
    fingerprint = params_hash({"params": logged_params, "data": files_digest(*manifests), "runtime": rt.key,
                               "from_prefix": why_not is None})
    previous = load_checkpoint(out.checkpoint, fingerprint)
    with tracked_run(experiment=experiment, run_name=variant,
                     tags={"variant": variant, "kind": "fine_tune", "stage": f"fine_tune@{variant}", **rt.tags()},
                     params=logged_params, run_id=previous["extra"].get("run_id") if previous else None) as run:
        with swap_prefix(clf, frozen if why_not is None else []):
            result = fit(
                FromPrefix(clf) if why_not is None else clf, train, val, cfg, seed=seed, runtime=rt,
                checkpoint=out.checkpoint, fingerprint=fingerprint, extra={"run_id": run.info.run_id},
                param_groups=param_groups(clf, top, lr=cfg.lr, decay=ft.block_lr_decay),
                before_epoch=make_before_epoch(top, ft.unfreeze_every, ft.train_bn),
                on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                        step=int(row["epoch"])),
            )
        # The trained modules live inside clf and the frozen ones are back: clf is the whole model.
        for p in clf.parameters():
            p.requires_grad_(True)
        metrics, timing, run_info = record_variant(
            run, variant=variant, model=clf, spec=spec, result=result, out=out, split_dir=split_dir,
            experiment=experiment, title=f"{variant}: {spec.arch}, top {ft.unfreeze_blocks} blocks")
    out.checkpoint.unlink(missing_ok=True)
    return {**metrics, **timing, **run_info, "unfrozen": top}
