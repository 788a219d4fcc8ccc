"""A training run's checkpoint: everything `fit` needs to resume a killed run bit for bit (model,
optimizer, scheduler, scaler, RNG states, history), and the fingerprint that says which run it is."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab.utils.files import atomic_write

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpointing:
    """Where `fit` saves its state after every epoch, and what a saved state must match to be resumed."""

    path: Path
    fingerprint: str  # the run's params, data and runtime (`cnnlab.tracking.runs.params_hash`)
    extra: dict = field(default_factory=dict)  # saved with it and handed back on resume (e.g. the MLflow run id)


@dataclass
class Progress:
    """Everything about a run that is not the model/optimizer/scheduler state: what a checkpoint
    adds to resume exactly, and what `fit` reports."""

    epoch: int = 0  # last completed epoch
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=lambda: {"epoch": 0, "val_accuracy": -1.0, "val_loss": math.inf})
    best_state: dict | None = None
    bad_epochs: int = 0
    train_seconds: float = 0.0
    seen: int = 0


def load_checkpoint(path: Path | None, fingerprint: str) -> dict | None:
    """The checkpoint at ``path`` if it belongs to this exact run (same params and data), else None."""
    if path is None or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and plain data only
    except Exception as exc:  # unreadable or tampered: start over rather than trust it
        _log.warning("ignoring checkpoint %s: cannot be read safely (%s)", path, type(exc).__name__)
        return None
    if state.get("fingerprint") != fingerprint:
        _log.warning("ignoring checkpoint %s: it was made with other params or data", path)
        return None
    return state


def save_checkpoint(path: Path, fingerprint: str, run: Progress, model: nn.Module, opt: torch.optim.Optimizer,
                     sched, scaler: torch.amp.GradScaler | None, device: torch.device, extra: dict | None) -> None:
    """Everything needed to resume bit for bit, RNG states included, written atomically."""
    state = {
        "fingerprint": fingerprint, "epoch": run.epoch, "model": model.state_dict(),
        "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best_state": run.best_state, "best": run.best, "history": run.history, "bad_epochs": run.bad_epochs,
        "train_seconds": run.train_seconds, "seen": run.seen, "rng": torch.get_rng_state(),
        # dropout on a GPU draws from the GPU's generator
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "extra": extra or {},
    }
    # data/checkpoints is no stage's output: a save cut short by SIGKILL is cleaned up here
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def restore(state: dict, model: nn.Module, opt: torch.optim.Optimizer, sched,
             scaler: torch.amp.GradScaler | None, device: torch.device) -> Progress:
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
    return Progress(epoch=state["epoch"], history=state["history"], best=state["best"],
                     best_state=state["best_state"], bad_epochs=state["bad_epochs"],
                     train_seconds=state["train_seconds"], seen=state["seen"])
