"""A variant's trained model as evaluate reads it, and its cached backbone features."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cnnlab.data.tensors import TensorSet
from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier
from cnnlab.training.engine import predict_logits
from cnnlab.training.features import FeatureCache, manifest_digest, trunk_digest
from cnnlab.training.hardware import Runtime

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """A variant's trained model as its stage left it in data/models/<name>/."""

    name: str
    model: Classifier
    spec: ModelSpec
    run_id: str | None  # the training run, from run.json
    val_accuracy: float


def load_variant(name: str, models: Path, classes: list[str], stage: str) -> Trained:
    folder = models / name
    if not (folder / "spec.json").exists() or not (folder / "weights.pt").exists():
        raise FileNotFoundError(f"{folder}: no model; run `dvc repro {stage}`")
    model, spec = load_classifier(folder)
    if list(spec.classes) != classes:
        raise ValueError(f"{folder / 'spec.json'}: its classes differ from the split's classes.json; the model "
                         f"is out of date, run `dvc repro {stage}`")
    run_file = folder / "run.json"
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        val_accuracy = float(run["val_accuracy"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_file}: not found; run `dvc repro {stage}`") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{run_file}: no numeric val_accuracy; run `dvc repro {stage}`") from None
    return Trained(name=name, model=model, spec=spec, run_id=run.get("run_id"), val_accuracy=val_accuracy)


def cached_features(v: Trained, split_dir: Path, split: str, cache: FeatureCache | None,
                     precisions: tuple[str, ...] = ("fp32",)) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features, labels) of ``split`` that feature_extract computed with this very backbone, in
    one of ``precisions``; None when there are none."""
    if cache is None or v.spec.kind != "pretrained":
        return None
    record = {"trunk": trunk_digest(v.model, arch=v.spec.arch, mode=v.spec.mode, image_size=v.spec.image_size),
              "manifest": manifest_digest(split_dir / f"{split}.csv")}
    return next((hit for p in precisions if (hit := cache.load(split, {**record, "precision": p})) is not None), None)


def cached_logits(v: Trained, split_dir: Path, split: str, images: TensorSet, cache: FeatureCache | None, *,
                   rt: Runtime) -> torch.Tensor | None:
    """A frozen-backbone model's logits on ``split`` from the feature cache: its head on the fp32
    features that feature_extract computed with this very backbone. None when there are none."""
    hit = cached_features(v, split_dir, split, cache)
    if hit is None or not torch.equal(hit[1], images.labels):
        return None
    _log.info("%s: %s features from %s (its backbone's own, computed once)", v.name, split, cache.folder)
    return predict_logits(v.model.net.head.to(rt.device), hit[0], batch_size=4096, device=rt.device)
