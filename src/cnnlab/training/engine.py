"""Training and evaluation loops over uint8 tensor sets.

Read top to bottom: `fit` builds the optimizer, scheduler and loss, then for each epoch draws a
seeded batch order, trains, evaluates on validation, keeps the best weights, checkpoints, and
stops early when validation stops improving. A killed run restarts from its last checkpoint
and ends bit-for-bit where an uninterrupted run would: batch order depends only on
(seed, epoch), and the checkpoint holds every other piece of state, RNG included. Under torchrun
each rank trains on its shard of every batch (`cnnlab.training.distributed`); rank 0 validates, decides
and checkpoints for all.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.training.distributed import SINGLE, World, all_sum, average_buffers, barrier, from_main, shard, wrap
from cnnlab.files import remove_leftovers
from cnnlab.run_guard import temp_prefix
from cnnlab.training.hardware import Runtime, resolve_runtime
from cnnlab.progress import progress

Augment = Callable[[torch.Tensor], torch.Tensor]


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): down-weights easy examples by (1 - p_t) ** gamma."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (k * n_c), the scikit-learn "balanced" rule: rare classes weigh more."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return len(labels) / (num_classes * counts)


def make_criterion(cfg: TrainParams, weight: torch.Tensor | None) -> nn.Module:
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def make_optimizer(params, cfg: TrainParams) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for the whole update instead of several per tensor; measured here, 18%
    # more training images/s for simple_cnn on CPU (3,095 vs 2,621).
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainParams, steps_per_epoch: int):
    """(scheduler or None, when it steps: "epoch", "batch" or "val_loss")."""
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, cfg.step_size, cfg.gamma), "epoch"
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs), "epoch"
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=cfg.gamma, patience=max(1, cfg.step_size // 3)), "val_loss"
    if cfg.scheduler == "onecycle":
        total = cfg.epochs * math.ceil(steps_per_epoch / cfg.accumulation_steps)
        peaks = [g["lr"] for g in opt.param_groups]  # per group, so discriminative rates survive
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=total), "batch"
    return None, "epoch"


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


def _atomic_save(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)  # a save cut short by SIGKILL; data/checkpoints is no stage's output
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name))
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_checkpoint(path: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this exact run (same params and data), else None."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:  # unreadable or tampered: start over rather than trust it
        print(f"ignoring checkpoint {path}: cannot be read safely ({type(exc).__name__})", file=sys.stderr)
        return None
    if state.get("fingerprint") != fingerprint:
        print(f"ignoring checkpoint {path}: it was made with other params or data", file=sys.stderr)
        return None
    return state


@dataclass
class _Progress:
    """Everything about a run that is not the model/optimizer/scheduler state: what a checkpoint
    adds to resume exactly, and what `fit` reports."""

    epoch: int = 0  # last completed epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf})
    best_state: dict | None = None
    bad_epochs: int = 0
    train_seconds: float = 0.0
    seen: int = 0


def fit(
    model: nn.Module,
    train: TrainSet,
    val: TensorSet,
    cfg: TrainParams,
    *,
    seed: int,
    runtime: Runtime | None = None,
    checkpoint: Path | None = None,
    fingerprint: str = "",
    extra: dict | None = None,
    augment: Augment | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    param_groups: list[dict] | None = None,
    before_epoch: Callable[[int, nn.Module], None] | None = None,
    world: World = SINGLE,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best weights by validation accuracy.

    ``runtime`` is the stage's resolved device and precision (`cnnlab.training.hardware.resolve_runtime`);
    None resolves ``cfg``'s. ``extra`` (e.g. the MLflow run id) is stored in the checkpoint and
    handed back on resume. ``augment`` is applied per sample to uint8 images when augmenting on
    the fly. ``param_groups`` (optimizer groups with their own "lr") give discriminative learning
    rates; ``before_epoch(epoch, model)`` runs after ``model.train()``, e.g. to unfreeze blocks or
    keep frozen BatchNorm layers in eval mode. It must depend on the epoch alone, so resuming works.
    ``world``: this process's rank among torchrun's (`cnnlab.training.distributed.init`); ``cfg.batch_size``
    is per rank, and only rank 0 calls ``on_epoch``, prints and writes the checkpoint.
    """
    rt = runtime or resolve_runtime(device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last,
                                    tf32=cfg.tf32)
    device = rt.device
    model.to(device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    if augment is None:  # on-the-fly augmentation works on CPU tensors, one image at a time
        train = resident(train, device)
    val = resident(val, device)
    n = len(train.versions)
    steps = math.ceil(math.ceil(n / world.size) / cfg.batch_size)  # per rank = the global count
    originals = train.labels[train.versions[:, 0]].cpu()
    weight = balanced_class_weights(originals, int(originals.max()) + 1) if cfg.class_weights == "balanced" else None
    criterion = make_criterion(cfg, weight).to(device)
    opt = make_optimizer(param_groups if param_groups is not None else model.parameters(), cfg)
    sched, sched_when = make_scheduler(opt, cfg, steps)
    # fp16's narrow range underflows small gradients; the scaler keeps them representable.
    scaler = torch.amp.GradScaler("cuda") if rt.precision == "fp16" and device.type == "cuda" else None

    run = _Progress(best_state=copy.deepcopy(model.state_dict()))
    state = load_checkpoint(checkpoint, fingerprint)
    if state is not None:
        run = _restore(state, model, opt, sched, scaler, device)
        extra = {**(extra or {}), **state.get("extra", {})}
        if world.main:
            print(f"resuming from {checkpoint} after epoch {run.epoch}", file=sys.stderr)
    resumed_from = run.epoch
    # After restoring: DDP copies rank 0's weights to the others. before_epoch may freeze blocks.
    net = wrap(model, world, device, some_frozen=before_epoch is not None)

    stopped_early = False
    for epoch in range(run.epoch + 1, cfg.epochs + 1):
        if cfg.early_stopping_patience is not None and run.bad_epochs >= cfg.early_stopping_patience:
            stopped_early = True
            break
        model.train()
        if before_epoch is not None:
            before_epoch(epoch, model)
        t0 = time.perf_counter()
        loss_sum, correct, count = _train_epoch(net, train, cfg, rt, criterion, opt, scaler,
                                                sched if sched_when == "batch" else None, seed=seed,
                                                epoch=epoch, augment=augment, world=world)
        average_buffers(model, world)
        epoch_seconds = time.perf_counter() - t0
        run.train_seconds += epoch_seconds
        run.seen += n
        # the training batch size: its activations fit, and on a CPU bigger inference batches
        # fall out of cache and run slower (1.6x for EfficientNet-Lite0 at 128 px, 32 vs 256)
        metrics = from_main(validate(model, val, batch_size=cfg.batch_size, device=device, precision=rt.precision,
                                     channels_last=rt.channels_last) if world.main else None, world)
        lr = opt.param_groups[0]["lr"]
        if sched is not None and sched_when == "epoch":
            sched.step()
        elif sched is not None and sched_when == "val_loss":
            sched.step(metrics["loss"])
        row = {"epoch": epoch, "train_loss": loss_sum / count, "train_accuracy": correct / count,
               "val_loss": metrics["loss"], "val_accuracy": metrics["accuracy"], "lr": lr,
               "epoch_seconds": epoch_seconds}
        improved = _record(run, row, model)
        if not world.main:
            continue
        print(f"epoch {epoch}/{cfg.epochs}: train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}"
              f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
              f"{' *' if improved else ''}", file=sys.stderr)
        if on_epoch is not None:
            on_epoch(row)
        if checkpoint is not None:
            _save_checkpoint(checkpoint, fingerprint, run, model, opt, sched, scaler, device, extra)
    barrier(world)  # the other ranks wait for rank 0's last checkpoint

    model.load_state_dict(run.best_state)
    return FitResult(
        history=run.history, best_epoch=int(run.best["epoch"]), best_val_accuracy=run.best["val_accuracy"],
        best_val_loss=run.best["val_loss"], stopped_early=stopped_early, train_seconds=run.train_seconds,
        train_images_per_second=run.seen / run.train_seconds if run.train_seconds else 0.0,
        resumed_from_epoch=resumed_from, extra=extra or {},
    )


def _train_epoch(model: nn.Module, train: TrainSet, cfg: TrainParams, rt: Runtime, criterion: nn.Module,
                 opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None, batch_sched, *, seed: int,
                 epoch: int, augment: Augment | None, world: World = SINGLE) -> tuple[float, int, int]:
    """One pass over the training set in a seeded order (this rank's shard of it); returns the
    summed loss, the correct count and the number of images, over all ranks.

    The sums stay on the device and are read once at the end: a per-batch ``.item()`` would wait
    for the GPU after every batch.
    """
    device, n = rt.device, len(train.versions)
    gen = epoch_generator(seed, epoch)
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
        if augment is not None:
            x = torch.stack([augment(img) for img in x])
        x, y = _to_device(x, device, rt.channels_last), y.to(device, non_blocking=True)
        with autocast(device, rt.precision):
            logits = model(x)
        loss = criterion(logits.float(), y)
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


def _record(run: _Progress, row: dict[str, float], model: nn.Module) -> bool:
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


def _save_checkpoint(path: Path, fingerprint: str, run: _Progress, model: nn.Module, opt: torch.optim.Optimizer,
                     sched, scaler: torch.amp.GradScaler | None, device: torch.device, extra: dict | None) -> None:
    """Everything needed to resume bit for bit, RNG states included, written atomically."""
    _atomic_save({
        "fingerprint": fingerprint, "epoch": run.epoch, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best_state": run.best_state, "best": run.best, "history": run.history, "bad_epochs": run.bad_epochs,
        "train_seconds": run.train_seconds, "seen": run.seen, "rng": torch.get_rng_state(),
        # dropout on a GPU draws from the GPU's generator
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "extra": extra or {},
    }, path)


def _restore(state: dict, model: nn.Module, opt: torch.optim.Optimizer, sched,
             scaler: torch.amp.GradScaler | None, device: torch.device) -> _Progress:
    """Load a checkpoint's state into the model, optimizer, scheduler, scaler and RNGs."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    if sched is not None:
        sched.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return _Progress(epoch=state["epoch"], history=state["history"], best=state["best"],
                     best_state=state["best_state"], bad_epochs=state["bad_epochs"],
                     train_seconds=state["train_seconds"], seen=state["seen"])
