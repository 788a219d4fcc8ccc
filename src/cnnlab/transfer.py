"""Transfer learning, the lesson's "fast feature extraction": a frozen ImageNet backbone runs once
per image, its pooled features are cached, and a small head trains on them (epochs then cost
almost nothing). The head is then put back on the backbone, so the logged model takes raw images
like every other variant.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from torch import nn

from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, split_classes, split_mode
from cnnlab.engine import evaluate, fit, predict_logits, resolve_device
from cnnlab.models.backbones import build_pretrained_classifier, create_backbone
from cnnlab.models.classifier import Classifier, ModelSpec
from cnnlab.tracking import params_hash, tracked_run
from cnnlab.training import TrainOutputs, files_digest, record_variant

SPLITS = ("train", "val", "test")


class Trunk(nn.Module):
    """A backbone Classifier without its head: uint8 images -> pooled features."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.clf.mean) / self.clf.std
        return self.clf.net.features(self.clf.net.to_rgb(x))


def backbone_spec(split_dir: Path, *, backbone: str, weights: str, image_size: int, dropout: float,
                  hidden: int | None) -> ModelSpec:
    """Grey data keeps one channel, normalized with the mean of the backbone's three values."""
    _, info = create_backbone(backbone, weights=None)  # architecture facts only: no weights needed
    mode = split_mode(split_dir)
    mean, std = list(info.mean), list(info.std)
    if mode == "L":
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return ModelSpec(kind="backbone", arch=backbone, classes=split_classes(split_dir), mode=mode,
                     image_size=image_size, mean=mean, std=std,
                     kwargs={"dropout": dropout, "hidden": hidden, "weights": weights})


def cached_features(
    clf: Classifier, split_dir: Path, cache_dir: Path, *, mode: str, size: int, key: str, batch_size: int,
    precision: str, channels_last: bool, device: torch.device,
) -> tuple[dict[str, TensorSet], float]:
    """Features of every split, from ``cache_dir`` when it was made with the same ``key`` (backbone,
    weights, size, data), else computed once and written there. Returns (sets, images/s or 0)."""
    key_file = cache_dir / "key.txt"
    if key_file.exists() and key_file.read_text() == key:
        sets = {}
        for split in SPLITS:
            data = torch.load(cache_dir / f"{split}.pt", map_location="cpu", weights_only=True)
            sets[split] = TensorSet(data["features"], data["labels"])
        print(f"reusing cached features in {cache_dir}")
        return sets, 0.0
    trunk = Trunk(clf).eval().to(device)
    if channels_last:
        trunk.to(memory_format=torch.channels_last)
    sets, seconds, count = {}, 0.0, 0
    cache_dir.mkdir(parents=True, exist_ok=True)
    key_file.unlink(missing_ok=True)  # a crash below must not leave a key that vouches for old files
    for split in SPLITS:
        images = load_split(split_dir, split, mode=mode, size=size)
        t0 = time.perf_counter()
        feats = predict_logits(trunk, images.images, batch_size=batch_size, device=device, precision=precision,
                               channels_last=channels_last)
        seconds += time.perf_counter() - t0
        count += len(images)
        sets[split] = TensorSet(feats, images.labels)
        torch.save({"features": feats, "labels": images.labels}, cache_dir / f"{split}.pt")
    key_file.write_text(key)
    return sets, count / seconds if seconds else 0.0


@dataclass(frozen=True)
class FeatureExtractConfig:
    backbone: str
    weights: str | None
    image_size: int
    extract_batch_size: int
    precision: str  # of the extraction pass
    channels_last: bool
    head_dropout: float
    head_hidden: int | None


def feature_extract(
    *, split_dir: Path, cache_dir: Path, fx: FeatureExtractConfig, head_cfg: TrainParams, seed: int,
    experiment: str, logged_params: dict[str, Any], out: TrainOutputs,
) -> dict[str, Any]:
    """The `feature_extract` stage: cached backbone features, a head trained on them, one MLflow run."""
    torch.manual_seed(seed)
    spec = backbone_spec(split_dir, backbone=fx.backbone, weights=fx.weights, image_size=fx.image_size,
                         dropout=fx.head_dropout, hidden=fx.head_hidden)
    clf = build_pretrained_classifier(spec)
    device = resolve_device(head_cfg.device)
    data_key = files_digest(*(split_dir / f"{s}.csv" for s in SPLITS))
    key = params_hash({"backbone": fx.backbone, "weights": fx.weights, "size": fx.image_size,
                       "precision": fx.precision, "data": data_key})
    sets, extract_rate = cached_features(clf, split_dir, cache_dir, mode=spec.mode, size=spec.image_size, key=key,
                                         batch_size=fx.extract_batch_size, precision=fx.precision,
                                         channels_last=fx.channels_last, device=device)
    train = TrainSet(sets["train"].images, sets["train"].labels, torch.arange(len(sets["train"]))[:, None])
    cfg, head = head_cfg, clf.net.head
    with tracked_run(experiment=experiment, run_name="feature_extract",
                     tags={"variant": "feature_extract", "stage": "feature_extract"}, params=logged_params) as run:
        result = fit(head, train, sets["val"], cfg, seed=seed, checkpoint=out.checkpoint,
                     fingerprint=params_hash({"params": logged_params, "key": key}),
                     on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                             step=int(row["epoch"])))
        # The head trained in place inside clf, so clf is now the complete image classifier.
        check = evaluate(clf, load_split(split_dir, "val", mode=spec.mode, size=spec.image_size),
                         batch_size=fx.extract_batch_size, device=device, precision=fx.precision)
        metrics, timing, run_info = record_variant(
            run, variant="feature_extract", model=clf, spec=spec, result=result, out=out, split_dir=split_dir,
            experiment=experiment, title=f"feature_extract: frozen {fx.backbone} + head",
            extra_metrics={"extract_images_per_second": extract_rate,
                           "combined_model_val_accuracy": check["accuracy"]})
    out.checkpoint.unlink(missing_ok=True)
    return {**metrics, **timing, **run_info}
