"""The sequence every trainable variant follows, whatever its kind; each kind's stage module
supplies only what differs (its model, its data, its `fit` options) as a `Plan`.

1. resolve the runtime (device, precision) and, under torchrun, join the process group;
2. seed, then let the kind build its model and load its data (`prepare`);
3. fingerprint the run (params, data, runtime) so a killed stage resumes only an identical run;
4. open the MLflow run (resuming the checkpoint's run), `fit` with per-epoch metrics logged;
5. rank 0 alone: let the kind finish the model (`Plan.finish`), then `record_variant`;
6. remove the checkpoint and leave the process group.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import torch
from torch import nn

from cnnlab.config import FitParams, RuntimeParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.models.classifier import ModelSpec
from cnnlab.tracking.runs import params_hash, tracked_run
from cnnlab.training import distributed
from cnnlab.training.checkpoint import Checkpointing, load_checkpoint
from cnnlab.training.distributed import World
from cnnlab.training.engine import FitResult, Hooks, fit
from cnnlab.training.hardware import Runtime, runtime_of
from cnnlab.training.outputs import TrainOutputs, record_variant

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VariantRun:
    """Which variant trains, and where its results go (paths from the dvc.yaml command line)."""

    name: str
    kind: str  # scratch | feature_extract | fine_tune
    stage: str  # the DVC stage, e.g. scratch@regularized
    seed: int
    experiment: str
    logged_params: dict[str, Any]  # cnnlab.tracking.run_params.run_params
    out: TrainOutputs


@dataclass(frozen=True)
class Finished:
    """The trained model as it is saved and served, and what its kind adds to the run."""

    model: nn.Module
    spec: ModelSpec
    title: str  # of the curves figure
    extra_metrics: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # printed by the stage script


@dataclass
class Plan:
    """What one kind hands `run_variant`."""

    trainee: nn.Module  # what `fit` trains: the classifier, a view of it, or its head alone
    train: TrainSet
    val: TensorSet
    cfg: FitParams  # the loop's settings
    runtime: Runtime  # that `fit` runs at
    data: list[Any]  # what identifies the data (digests): part of the checkpoint's fingerprint
    finish: Callable[[FitResult], Finished]  # after `fit`, inside the run, on rank 0
    hooks: Hooks = Hooks()  # augment, param_groups, before_epoch (on_epoch: run_variant's MLflow logging)
    around_fit: Callable[[], AbstractContextManager] = nullcontext


@dataclass(frozen=True)
class VariantResult:
    """What the stage script prints (the DVC metrics are in ``out.metrics`` too)."""

    metrics: dict[str, Any]
    timing: dict[str, float]
    run_id: str
    summary: dict[str, Any]


def run_variant(v: VariantRun, runtime: RuntimeParams, prepare: Callable[[Runtime, World], Plan], *,
                batch_size: int, processes: bool = True) -> VariantResult | None:
    """Train variant ``v`` end to end (see the module docstring) at ``runtime`` (its section's),
    with ``prepare`` building its kind's model and data. With ``processes`` the stage may run
    under torchrun, and every rank but 0 returns None."""
    rt = runtime_of(runtime)
    if processes:
        world, rt = distributed.join(rt, v.stage, batch_size)
    else:
        world = distributed.SINGLE
        _log.info("%s: %s", v.stage, rt.describe())
    # world_size only where torchrun may run it (a single-process kind has no such setting)
    logged = {**v.logged_params, **rt.params(), **({"world_size": world.size} if processes else {})}
    torch.manual_seed(v.seed)
    plan = prepare(rt, world)
    fingerprint = params_hash({"params": logged, "data": plan.data, "runtime": rt.key})
    previous = load_checkpoint(v.out.checkpoint, fingerprint)
    resume = previous["extra"].get("run_id") if previous else None  # the killed run goes on
    tracking = tracked_run(experiment=v.experiment, run_name=v.name, params=logged, run_id=resume,
                           tags={"variant": v.name, "kind": v.kind, "stage": v.stage, **rt.tags()})
    with tracking if world.main else nullcontext() as run:
        with plan.around_fit():
            checkpoint = Checkpointing(v.out.checkpoint, fingerprint, {"run_id": run.info.run_id} if run else {})
            result = fit(plan.trainee, plan.train, plan.val, plan.cfg, seed=v.seed, runtime=plan.runtime,
                         checkpoint=checkpoint, world=world,
                         hooks=replace(plan.hooks, on_epoch=_log_epoch if run else None))
        if run is None:  # a rank other than 0: rank 0 writes everything
            distributed.close(world)
            return None
        done = plan.finish(result)
        metrics, timing = record_variant(run, variant=v.name, model=done.model, spec=done.spec, result=result,
                                         out=v.out, experiment=v.experiment, title=done.title,
                                         extra_metrics=done.extra_metrics)
    v.out.checkpoint.unlink(missing_ok=True)
    distributed.close(world)
    return VariantResult(metrics=metrics, timing=timing, run_id=run.info.run_id, summary=done.summary)


def _log_epoch(row: dict[str, float]) -> None:
    mlflow.log_metrics({k: val for k, val in row.items() if k != "epoch"}, step=int(row["epoch"]))
