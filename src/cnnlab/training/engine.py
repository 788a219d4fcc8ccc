"""Training and evaluation loops over uint8 tensor sets.

Read top to bottom: `fit` sets up the optimizer, scheduler and loss (`_setup`), resumes a
checkpoint if there is one, then for each epoch (`_epoch`) draws a
seeded batch order, trains, evaluates on validation, keeps the best weights, checkpoints, and
stops early when validation stops improving. A killed run restarts from its last checkpoint
and ends bit-for-bit where an uninterrupted run would: batch order depends only on
(seed, epoch), and the checkpoint holds every other piece of state, RNG included. Under torchrun
each rank trains on its shard of every batch (`cnnlab.training.distributed`); rank 0 validates, decides
and checkpoints for all.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import FitParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.utils.progress import progress
from cnnlab.training.checkpoint import (
    Checkpointing,
    Progress,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from cnnlab.training.distributed import (
    SINGLE,
    World,
    all_sum,
    average_buffers,
    barrier,
    from_main,
    shard,
    wrap,
)
from cnnlab.training.hardware import Runtime, runtime_of
from cnnlab.training.losses import class_weights, make_criterion
from cnnlab.training.optim import make_optimizer, make_scheduler

_log = logging.getLogger(__name__)

Augment = Callable[[torch.Tensor], torch.Tensor]


def autocast(device: torch.device, precision: str):
    """Autocast to bf16/fp16 for a resolved precision (`cnnlab.training.hardware`); fp32 = off."""
    if precision == "fp32":
        return nullcontext()
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision = 'fp16' needs CUDA; on CPU use 'auto', 'bf16' or 'fp32'")
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.inference_mode()
def _logits(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device, precision: str,
            channels_last: bool) -> torch.Tensor:
    """Float32 logits, left on ``device`` (one copy back at the end, not one sync per batch)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = _to_device(images[start:start + batch_size], device, channels_last)
        with autocast(device, precision):
            out.append(model(x).float())
    return torch.cat(out) if out else torch.empty(0, device=device)


def predict_logits(model: nn.Module, images: torch.Tensor, *, batch_size: int, device: torch.device,
                   precision: str = "fp32", channels_last: bool = False) -> torch.Tensor:
    """Float32 logits on the CPU for uint8 images, in batches, model in eval mode."""
    return _logits(model, images, batch_size=batch_size, device=device, precision=precision,
                   channels_last=channels_last).cpu()


def validate(model: nn.Module, data: TensorSet, *, batch_size: int, device: torch.device,
             precision: str = "fp32", channels_last: bool = False) -> dict[str, float]:
    """Plain cross-entropy and exact per-sample accuracy (not a mean of batch means)."""
    logits = _logits(model, data.images, batch_size=batch_size, device=device, precision=precision,
                     channels_last=channels_last)
    labels = data.labels.to(logits.device)
    loss = F.cross_entropy(logits, labels, reduction="sum").item()
    correct = (logits.argmax(1) == labels).sum().item()
    return {"loss": loss / len(data), "accuracy": correct / len(data)}


def resident(data: TensorSet, device: torch.device) -> TensorSet:
    """``data`` moved onto an accelerator when it fits comfortably (a quarter of its free memory),
    so a batch is an index into device memory rather than a host-to-device copy; else as is."""
    if device.type == "cpu" or data.images.device == device:
        return data
    size = sum(t.numel() * t.element_size() for t in vars(data).values() if isinstance(t, torch.Tensor))
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else 1 << 30  # mps: no query; 1 GiB
    if size > free // 4:
        return data
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(data).items()}
    return type(data)(**moved)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The batch order of an epoch depends on (seed, epoch) alone, so a resumed run repeats it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))


@dataclass
class FitResult:
    history: list[dict[str, float]]
    best_epoch: int
    best_val_accuracy: float
    best_val_loss: float
    stopped_early: bool
    train_seconds: float
    train_images_per_second: float
    resumed_from_epoch: int = 0
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Hooks:
    """What a kind of variant changes in the loop; each is optional."""

    augment: Augment | None = None  # per sample, on uint8 CPU images: augmentation on the fly
    param_groups: list[dict] | None = None  # optimizer groups with their own "lr": discriminative rates
    # After model.train() each epoch, e.g. to unfreeze blocks or keep frozen BatchNorm layers in eval
    # mode; it must depend on the epoch alone, so that a resumed run does the same.
    before_epoch: Callable[[int, nn.Module], None] | None = None
    on_epoch: Callable[[dict[str, float]], None] | None = None  # each epoch's row, on rank 0 (MLflow)


@dataclass
class _Loop:
    """What every epoch of one `fit` uses, set up once."""

    model: nn.Module
    train: TrainSet
    val: TensorSet
    cfg: FitParams
    rt: Runtime
    seed: int
    hooks: Hooks
    world: World
    criterion: nn.Module
    opt: torch.optim.Optimizer
    sched: object  # a torch LR scheduler or None
    sched_when: str  # "epoch", "batch" or "val_loss"
    scaler: torch.amp.GradScaler | None
    net: nn.Module | None = None  # the model as trained: DDP-wrapped under torchrun


def fit(model: nn.Module, train: TrainSet, val: TensorSet, cfg: FitParams, *, seed: int,
        runtime: Runtime | None = None, checkpoint: Checkpointing | None = None, hooks: Hooks = Hooks(),
        world: World = SINGLE) -> FitResult:
    """Train ``model`` in place; on return it holds the best weights by validation accuracy.

    ``runtime`` is the stage's resolved device and precision (None: ``cfg.runtime`` resolved here).
    With ``checkpoint`` the state is saved after every epoch and a saved state of the same
    fingerprint is resumed; its ``extra`` comes back in the result. ``world``: this process's rank
    among torchrun's (`cnnlab.training.distributed`); ``cfg.batch_size`` is per rank, and only rank
    0 reports, calls ``hooks.on_epoch`` and writes the checkpoint.
    """
    loop = _setup(model, train, val, cfg, seed=seed, rt=runtime or runtime_of(cfg.runtime), hooks=hooks,
                  world=world)
    run, extra = Progress(best_state=copy.deepcopy(model.state_dict())), dict(checkpoint.extra) if checkpoint else {}
    state = load_checkpoint(checkpoint.path, checkpoint.fingerprint) if checkpoint else None
    if state is not None:
        run = restore(state, model, loop.opt, loop.sched, loop.scaler, loop.rt.device)
        extra = {**extra, **state.get("extra", {})}
        if world.main:
            _log.info("resuming from %s after epoch %d", checkpoint.path, run.epoch)
    resumed_from = run.epoch
    # After restoring: DDP copies rank 0's weights to the others. before_epoch may freeze blocks.
    loop.net = wrap(model, world, loop.rt.device, some_frozen=hooks.before_epoch is not None)
    stopped_early = False
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        if cfg.early_stopping_patience is not None and run.bad_epochs >= cfg.early_stopping_patience:
            stopped_early = True
            break
        row = _epoch(loop, epoch, run)
        improved = _record(run, row, model)
        if not world.main:
            continue
        _log.info("epoch %d/%d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%%%s", epoch, cfg.epochs,
                  row["train_loss"], 100 * row["train_accuracy"], row["val_loss"], 100 * row["val_accuracy"],
                  " *" if improved else "")
        if hooks.on_epoch is not None:
            hooks.on_epoch(row)
        if checkpoint is not None:
            save_checkpoint(checkpoint.path, checkpoint.fingerprint, run, model, loop.opt, loop.sched, loop.scaler,
                            loop.rt.device, extra)
    barrier(world)  # the other ranks wait for rank 0's last checkpoint
    model.load_state_dict(run.best_state)
    return FitResult(
        history=run.history, best_epoch=int(run.best["epoch"]), best_val_accuracy=run.best["val_accuracy"],
        best_val_loss=run.best["val_loss"], stopped_early=stopped_early, train_seconds=run.train_seconds,
        train_images_per_second=run.seen / run.train_seconds if run.train_seconds else 0.0,
        resumed_from_epoch=resumed_from, extra=extra,
    )


def _setup(model: nn.Module, train: TrainSet, val: TensorSet, cfg: FitParams, *, seed: int, rt: Runtime,
           hooks: Hooks, world: World) -> _Loop:
    """The model on its device, the data resident there, and the loss, optimizer and schedule."""
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    if hooks.augment is None:  # on-the-fly augmentation works on CPU tensors, one image at a time
        train = resident(train, rt.device)
    val = resident(val, rt.device)
    steps = math.ceil(math.ceil(len(train.versions) / world.size) / cfg.batch_size)  # per rank = the global count
    originals = train.labels[train.versions[:, 0]].cpu()
    weight = class_weights(cfg.class_weights, originals, int(originals.max()) + 1)
    if cfg.class_weights == "auto" and world.main:
        counts = torch.bincount(originals)
        _log.info("class_weights auto: %s (largest class %d images, smallest %d)",
                  "balanced" if weight is not None else "none", counts.max(), counts.min())
    opt = make_optimizer(hooks.param_groups if hooks.param_groups is not None else model.parameters(), cfg)
    sched, sched_when = make_scheduler(opt, cfg, steps)
    # fp16's narrow range underflows small gradients; the scaler keeps them representable.
    scaler = torch.amp.GradScaler("cuda") if rt.precision == "fp16" and rt.device.type == "cuda" else None
    return _Loop(model=model, train=train, val=val, cfg=cfg, rt=rt, seed=seed, hooks=hooks, world=world,
                 criterion=make_criterion(cfg, weight).to(rt.device), opt=opt, sched=sched, sched_when=sched_when,
                 scaler=scaler)


def _epoch(loop: _Loop, epoch: int, run: Progress) -> dict[str, float]:
    """Train one epoch, validate (rank 0, shared with the others), step the schedule; the epoch's row."""
    loop.model.train()
    if loop.hooks.before_epoch is not None:
        loop.hooks.before_epoch(epoch, loop.model)
    t0 = time.perf_counter()
    loss_sum, correct, count = _train_epoch(loop, epoch)
    average_buffers(loop.model, loop.world)
    epoch_seconds = time.perf_counter() - t0
    run.train_seconds += epoch_seconds
    run.seen += len(loop.train.versions)
    # the training batch size: its activations fit, and on a CPU bigger inference batches fall out of
    # cache and run slower
    metrics = from_main(validate(loop.model, loop.val, batch_size=loop.cfg.batch_size, device=loop.rt.device,
                                 precision=loop.rt.precision, channels_last=loop.rt.channels_last)
                        if loop.world.main else None, loop.world)
    lr = loop.opt.param_groups[0]["lr"]
    if loop.sched is not None and loop.sched_when == "epoch":
        loop.sched.step()
    elif loop.sched is not None and loop.sched_when == "val_loss":
        loop.sched.step(metrics["loss"])
    return {"epoch": epoch, "train_loss": loss_sum / count, "train_accuracy": correct / count,
            "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"], "lr": lr,
            "epoch_seconds": epoch_seconds}


def _train_epoch(loop: _Loop, epoch: int) -> tuple[float, int, int]:
    """One pass over the training set in a seeded order (this rank's shard of it); returns the
    summed loss, the correct count and the number of images, over all ranks.

    The sums stay on the device and are read once at the end: a per-batch ``.item()`` would wait
    for the GPU after every batch.
    """
    model, train, cfg, rt, opt, scaler, world = loop.net, loop.train, loop.cfg, loop.rt, loop.opt, loop.scaler, loop.world
    batch_sched = loop.sched if loop.sched_when == "batch" else None
    device, n = rt.device, len(train.versions)
    gen = epoch_generator(loop.seed, epoch)
    order = torch.randperm(n, generator=gen)
    pick = torch.randint(0, train.versions.shape[1], (n,), generator=gen)
    rows = shard(train.versions.cpu()[order, pick[order]], world).to(train.images.device)
    steps = math.ceil(len(rows) / cfg.batch_size)
    # float64 like the Python floats these sums once were; Metal has no float64
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    opt.zero_grad(set_to_none=True)
    for b in progress(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", disable=not world.main):
        idx = rows[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        x, y = train.images[idx], train.labels[idx]
        if loop.hooks.augment is not None:
            x = torch.stack([loop.hooks.augment(img) for img in x])
        x, y = _to_device(x, device, rt.channels_last), y.to(device, non_blocking=True)
        with autocast(device, rt.precision):
            logits = model(x)
        loss = loop.criterion(logits.float(), y)
        group = min(cfg.accumulation_steps, steps - (b // cfg.accumulation_steps) * cfg.accumulation_steps)
        (scaler.scale(loss / group) if scaler else loss / group).backward()
        if (b + 1) % cfg.accumulation_steps == 0 or b + 1 == steps:
            if scaler:
                scaler.unscale_(opt)
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], cfg.grad_clip)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if batch_sched is not None:
                batch_sched.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    # gloo reduces float64 and int64 as well as nccl does
    all_sum(loss_sum, world), all_sum(correct, world)
    return loss_sum.item(), int(correct.item()), len(rows) * world.size


def _record(run: Progress, row: dict[str, float], model: nn.Module) -> bool:
    """Add an epoch to the history; keep the weights when validation improved. Returns improved."""
    run.epoch = int(row["epoch"])
    run.history.append(row)
    improved = row["val_accuracy"] > run.best["val_accuracy"] or (
        row["val_accuracy"] == run.best["val_accuracy"] and row["val_loss"] < run.best["val_loss"])
    if improved:
        run.best = {"epoch": run.epoch, "val_accuracy": row["val_accuracy"], "val_loss": row["val_loss"]}
        run.best_state = copy.deepcopy(model.state_dict())
        run.bad_epochs = 0
    else:
        run.bad_epochs += 1
    return improved


