"""Data-parallel training over several processes (torch.distributed, launched by torchrun).

``distributed.nproc_per_node`` > 1 makes a training stage re-launch itself under
``torchrun --standalone`` (`relaunch`), one process per GPU (or per CPU share). Launched by a
user's own torchrun (several machines: ``--nnodes``, ``--rdzv-endpoint``), it joins as it is.
Every rank draws the same seeded batch order of an epoch and takes every ``world_size``-th row of
it (`shard`), so the b-th batches of all ranks together are the b-th batch of one process with a
``world_size`` times larger batch; DDP averages the gradients. BatchNorm layers normalize with
their rank's batch (SyncBatchNorm has no CPU kernels), and their running statistics are averaged
across ranks at the end of each epoch (`average_buffers`), as timm does. Only rank 0 talks to
MLflow and writes checkpoints and outputs.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

_log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


SINGLE = World()


def world_from_env() -> World:
    """The world torchrun describes in RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) <= 1:
        return SINGLE
    return World(rank=int(env["RANK"]), size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", "0")),
                 local_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))


def relaunch(nproc_per_node: int) -> None:
    """Re-run this script under ``torchrun --standalone --nproc_per_node=N`` (never returns) when
    N > 1 and it is not already running under torchrun; otherwise return at once."""
    if nproc_per_node <= 1 or "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(torchrun, [torchrun, "--standalone", f"--nproc_per_node={nproc_per_node}", sys.argv[0], *sys.argv[1:]])


def init(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group (nccl on CUDA, gloo otherwise); returns the world and this rank's
    device (``cuda:<local rank>`` on CUDA). A no-op for a single process."""
    world = world_from_env()
    if not world.active:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    else:
        # Ranks on one machine share its cores; more threads each only makes them fight.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world.local_size))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, device


def join(runtime: R, label: str, batch_size: int) -> tuple[World, R]:
    """`init` for a training stage: joins the group, moves ``runtime`` (a `cnnlab.training.hardware.Runtime`)
    to this rank's device, and prints the runtime line once (rank 0) as ``label: ...``."""
    world, device = init(runtime.device)
    runtime = replace(runtime, device=device)
    if world.main:
        ranks = f", {world.size} processes (batch {batch_size} each)" if world.active else ""
        _log.info("%s: %s%s", label, runtime.describe(), ranks)
    return world, runtime


def close(world: World) -> None:
    if world.active and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(rows: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's rows of an epoch's order: every ``size``-th, after padding the order with its
    own first rows to a multiple of ``size`` (as DistributedSampler does), so every rank has as
    many batches of the same size and DDP's mean of means is the mean over the global batch."""
    if not world.active:
        return rows
    pad = -len(rows) % world.size
    if pad:
        rows = torch.cat([rows, rows[:pad]])
    return rows[world.rank::world.size]


def wrap(model: nn.Module, world: World, device: torch.device, *, some_frozen: bool = False) -> nn.Module:
    """``model`` in DistributedDataParallel when there are several ranks, else as is.
    broadcast_buffers=False: each rank keeps its BatchNorm statistics until `average_buffers`.
    ``some_frozen``: parameters may get no gradient (fine-tuning freezes blocks epoch by epoch),
    which DDP must be told to expect."""
    if not world.active:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False,
                                               find_unused_parameters=some_frozen)


@torch.no_grad()
def average_buffers(model: nn.Module, world: World) -> None:
    """Average the floating-point buffers (BatchNorm running mean and variance) over the ranks."""
    if not world.active:
        return
    for buf in model.buffers():
        if buf.is_floating_point():
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            buf.div_(world.size)


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """``value`` summed over the ranks (in place); as is for one process."""
    if world.active:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def from_main(obj: T, world: World) -> T:
    """Rank 0's ``obj`` on every rank: decisions (early stopping, best epoch) stay in step."""
    if not world.active:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()
