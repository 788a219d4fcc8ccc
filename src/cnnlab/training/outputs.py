"""What every variant's stage leaves behind, the same for every kind: the saved model, its history
and curves, the DVC metrics, ``run.json``, and in its MLflow run the summary metrics, plots and
the trained model's files. The servable pyfunc is logged by `register`, so that serving code is
not a dependency of training."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from cnnlab.utils.files import write_csv, write_json
from cnnlab.models.classifier import ModelSpec, save_classifier
from cnnlab.training.curves import plot_history
from cnnlab.training.engine import FitResult

# Committed to git as DVC plot data (dvc.yaml: cache: false), so what the params and data decide
# only: a re-run writes the same bytes. Each epoch's seconds are in the run's MLflow metrics.
HISTORY_FIELDS = ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


@dataclass(frozen=True)
class TrainOutputs:
    """Where one variant's results go (paths come from the dvc.yaml command line)."""

    model_dir: Path  # spec.json, weights.pt, run.json
    metrics: Path  # DVC metrics JSON
    history: Path  # DVC plots CSV, x = epoch
    curves: Path  # PNG
    checkpoint: Path  # last-epoch state for resuming; removed when the stage succeeds


def record_variant(
    run: mlflow.ActiveRun,
    *,
    variant: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    result: FitResult,
    out: TrainOutputs,
    experiment: str,
    title: str,
    extra_metrics: dict[str, float] | None = None,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Everything a finished variant leaves behind, the same for every variant: the saved model,
    history CSV, curves, DVC metrics, and in the active MLflow run the summary metrics, plots
    and the model folder (``classifier/``: spec.json, weights.pt). Returns (DVC metrics, timings)."""
    model.to("cpu").to(memory_format=torch.contiguous_format)
    save_classifier(model, spec, out.model_dir)
    write_csv(out.history, HISTORY_FIELDS, ({k: row[k] for k in HISTORY_FIELDS} for row in result.history))
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
    mlflow.log_artifacts(str(out.model_dir), "classifier")
    # val_accuracy here too: evaluate and register read every variant from data/models/<name>/ (the
    # one folder DVC can hand them for any set of variants) and choose the champion by it.
    write_json(out.model_dir / "run.json", {"run_id": run.info.run_id, "experiment": experiment, "variant": variant,
                                            "val_accuracy": result.best_val_accuracy})
    write_json(out.metrics, metrics)
    return metrics, timing
