"""The `train` stage's work for one from-scratch variant: data, model, fit, outputs, MLflow run."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from cnnlab.config import AugmentParams, TrainParams
from cnnlab.data.split import read_manifest
from cnnlab.data.tensors import load_split, load_train, split_classes, split_mode
from cnnlab.engine import FitResult, fit, load_checkpoint
from cnnlab.files import write_csv, write_json
from cnnlab.hardware import resolve_runtime
from cnnlab.models.classifier import ModelSpec, build_classifier, save_classifier
from cnnlab.models.zoo import init_weights
from cnnlab.plots import plot_history
from cnnlab.serving import log_classifier
from cnnlab.tracking import files_digest, params_hash, tracked_run

HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "epoch_seconds")


@dataclass(frozen=True)
class TrainOutputs:
    """Where one variant's results go (paths come from the dvc.yaml command line)."""

    model_dir: Path  # spec.json, weights.pt, run.json
    metrics: Path  # DVC metrics JSON
    history: Path  # DVC plots CSV, x = epoch
    curves: Path  # PNG
    checkpoint: Path  # last-epoch state for resuming; removed when the stage succeeds


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
    """Train one variant end to end; returns its metrics (also written to ``out.metrics``)."""
    rt = resolve_runtime(device=cfg.device, precision=cfg.precision, channels_last=cfg.channels_last, tf32=cfg.tf32)
    print(f"train@{variant}: {rt.describe()}", file=sys.stderr)
    logged_params = {**logged_params, **rt.params()}
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

    with tracked_run(experiment=experiment, run_name=variant,
                     tags={"variant": variant, "kind": "scratch", "stage": f"train@{variant}", **rt.tags()},
                     params=logged_params, run_id=resume_run) as run:
        result = fit(
            model, train, val, cfg, seed=seed, runtime=rt, checkpoint=out.checkpoint, fingerprint=fingerprint,
            extra={"run_id": run.info.run_id}, augment=augment,
            on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                    step=int(row["epoch"])),
        )
        metrics, timing, run_info = record_variant(
            run, variant=variant, model=model, spec=spec, result=result, out=out, split_dir=split_dir,
            experiment=experiment, title=f"{variant}: {cfg.arch}, dropout {dropout:g}")
    out.checkpoint.unlink(missing_ok=True)
    return {**metrics, **timing, **run_info, "spec": asdict(spec)}


def serving_limits(split_dir: Path) -> dict[str, Any]:
    """The split's decode limits, which the served model repeats on raw uploads (see serving.py)."""
    meta = split_dir / "preprocess.json"
    if not meta.exists():  # a split written before this file existed: re-run `split` to get it
        return {}
    settings = json.loads(meta.read_text())
    return {"max_pixels": settings["max_image_pixels"], "max_side": settings["max_side"]}


def record_variant(
    run: mlflow.ActiveRun,
    *,
    variant: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    result: FitResult,
    out: TrainOutputs,
    split_dir: Path,
    experiment: str,
    title: str,
    extra_metrics: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, float], dict[str, str]]:
    """Everything a finished variant leaves behind, the same for every variant: the saved model,
    history CSV, curves, DVC metrics, and in the active MLflow run the summary metrics, plots
    and the serving pyfunc. Returns (DVC metrics, timings, run info)."""
    model.to("cpu").to(memory_format=torch.contiguous_format)
    save_classifier(model, spec, out.model_dir)
    write_csv(out.history, HISTORY_FIELDS, result.history)
    plot_history(result.history, out.curves, title=title, best_epoch=result.best_epoch)
    # The DVC metrics hold only what the params and data determine, so a re-run on the same
    # machine reproduces the file byte for byte; timings go to MLflow only.
    metrics = {
        "val_accuracy": result.best_val_accuracy,
        "val_loss": round(result.best_val_loss, 6),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    timing = {"train_seconds": result.train_seconds, "train_images_per_second": result.train_images_per_second,
              **(extra_metrics or {})}
    mlflow.log_metrics({"best_val_accuracy": result.best_val_accuracy, "best_val_loss": result.best_val_loss,
                        "best_epoch": result.best_epoch, "epochs_run": len(result.history), **timing})
    mlflow.log_artifact(str(out.history), "plots")
    mlflow.log_artifact(str(out.curves), "plots")
    examples = [Path(r["path"]).read_bytes() for r in read_manifest(split_dir, "val")[:2]]
    info = log_classifier(out.model_dir, example_images=examples, **serving_limits(split_dir))
    # val_accuracy here too: evaluate and register read every variant from data/models/<name>/ (the
    # one folder DVC can hand them for any set of variants) and choose the champion by it.
    run_info = {"run_id": run.info.run_id, "experiment": experiment, "model_uri": info.model_uri,
                "variant": variant, "val_accuracy": result.best_val_accuracy}
    write_json(out.model_dir / "run.json", run_info)
    write_json(out.metrics, metrics)
    return metrics, timing, run_info
