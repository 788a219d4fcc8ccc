"""Stage `fine_tune@<variant>`: a feature_extract variant's model (backbone + its trained head, never
a random head) with the top N backbone blocks unfrozen, trained at discriminative learning rates.

Why each rule: a random head would send large gradients into pretrained blocks and wreck them,
so fine-tuning starts from the trained head; the head learns fastest, the top blocks slower and
lower blocks slower still (each block down gets ``block_lr_decay`` times the rate above it);
BatchNorm layers in frozen blocks stay in eval mode so their ImageNet statistics are not
overwritten by small batches of a different domain.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from cnnlab.config import FineTuneVariant
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, load_train
from cnnlab.utils.files import files_digest
from cnnlab.models.backbones import create_backbone
from cnnlab.models.classifier import Classifier, load_classifier
from cnnlab.stages.variant import Finished, Plan, VariantResult, VariantRun, run_variant
from cnnlab.training.distributed import World
from cnnlab.training.engine import FitResult, Hooks
from cnnlab.training.hardware import Runtime
from cnnlab.training.prefix_cache import (
    FromPrefix,
    prefix_cacheable,
    prefix_outputs,
    swap_prefix,
)

_log = logging.getLogger(__name__)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


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


def fine_tune(v: VariantRun, cfg: FineTuneVariant, *, split_dir: Path, augmented_dir: Path,
              start_model: Path) -> VariantResult | None:
    """Unfreeze the top blocks of a feature_extract model (``start_model``) and train; one MLflow run.
    Under torchrun rank 0 alone writes the outputs (the others return None)."""
    augmented = augmented_dir if cfg.train_data == "augmented" else None

    def prepare(rt: Runtime, world: World) -> Plan:
        clf, spec = load_classifier(start_model)
        if spec.kind != "pretrained":
            raise ValueError(f"{start_model}: fine_tune starts from a pretrained model (feature_extract), "
                             f"got {spec.kind!r}")
        _, info = create_backbone(spec.arch, weights=None)  # block names only
        if not 1 <= cfg.unfreeze_blocks <= len(info.blocks):
            raise ValueError(f"fine_tune.unfreeze_blocks = {cfg.unfreeze_blocks}: {spec.arch} has "
                             f"{len(info.blocks)} blocks ({', '.join(info.blocks)})")
        top = list(reversed(info.blocks))[: cfg.unfreeze_blocks]  # nearest the head first
        frozen = [b for b in info.blocks if b not in top]  # input side first
        train = load_train(split_dir, augmented, mode=spec.mode, size=spec.image_size)
        val = load_split(split_dir, "val", mode=spec.mode, size=spec.image_size)
        why_not = (prefix_cacheable(clf, frozen, val.images[:8], rt=rt, images=len(train) + len(val))
                   if cfg.cache_frozen else "cache_frozen is off")
        if why_not is None:
            if world.main:
                _log.info("fine_tune: %s stay frozen all run; their output is computed once per image",
                          ", ".join(frozen))
            train = TrainSet(prefix_outputs(clf, frozen[-1], train.images, rt=rt), train.labels, train.versions)
            val = TensorSet(prefix_outputs(clf, frozen[-1], val.images, rt=rt), val.labels)
        elif frozen and world.main:
            _log.info("fine_tune: the frozen blocks run every epoch (%s)", why_not)
        manifests = [split_dir / "train.csv", split_dir / "val.csv", split_dir / "shards.json",
                     start_model / "weights.pt"]
        if augmented is not None:
            manifests += [augmented / "train.csv", augmented / "shards.json"]

        def finish(result: FitResult) -> Finished:
            # The trained modules live inside clf and the frozen ones are back: clf is the whole model.
            for p in clf.parameters():
                p.requires_grad_(True)
            return Finished(clf, spec, f"{v.name}: {spec.arch}, top {cfg.unfreeze_blocks} blocks",
                            summary={"unfrozen": top})

        cached = why_not is None
        return Plan(trainee=FromPrefix(clf) if cached else clf, train=train, val=val, cfg=cfg, runtime=rt,
                    data=[files_digest(*manifests), {"from_prefix": cached}], finish=finish,
                    hooks=Hooks(param_groups=param_groups(clf, top, lr=cfg.lr, decay=cfg.block_lr_decay),
                                before_epoch=make_before_epoch(top, cfg.unfreeze_every, cfg.train_bn)),
                    around_fit=lambda: swap_prefix(clf, frozen if cached else []))

    return run_variant(v, cfg.runtime, prepare, batch_size=cfg.batch_size)
