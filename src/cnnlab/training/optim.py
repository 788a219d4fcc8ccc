"""Optimizers and learning-rate schedules from the loop's settings."""

from __future__ import annotations

import math

import torch

from cnnlab.config import FitParams


def make_optimizer(params, cfg: FitParams) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.momentum > 0)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    # fused: one kernel for the whole update instead of several per tensor (docs/benchmarks.md).
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)


def make_scheduler(opt: torch.optim.Optimizer, cfg: FitParams, steps_per_epoch: int):
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
