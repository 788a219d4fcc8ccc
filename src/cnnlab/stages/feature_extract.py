"""Stage `feature_extract@<variant>`: transfer learning, the lesson's "fast feature extraction": a frozen ImageNet backbone runs once
per image, its pooled features are cached, and a small head trains on them (epochs then cost
almost nothing). The head is then put back on the backbone, so the logged model takes raw images
like every other variant.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch

from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, split_classes, split_mode, train_versions
from cnnlab.training.engine import fit, predict_logits
from cnnlab.training.features import FeatureCache, Trunk, manifest_digest, trunk_digest
from cnnlab.training.hardware import Runtime, resolve_runtime
from cnnlab.models.backbones import create_backbone
from cnnlab.models.classifier import Classifier, ModelSpec, build_pretrained_classifier
from cnnlab.files import files_digest
from cnnlab.tracking.runs import params_hash, tracked_run
from cnnlab.training.outputs import TrainOutputs, record_variant

SPLITS = ("train", "val", "test")
# The augment stage's copies of the training images, for a head trained on augmented features.
AUGMENTED = "augmented"


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


def split_precision(split: str, rt: Runtime) -> str:
    """The training features (originals and augmented copies) use the stage's precision; validation
    and test features are what the model is chosen and tested on, so they are computed in fp32, as
    the served model computes (and `evaluate` reuses the test features instead of running the
    backbone again)."""
    return rt.precision if split in ("train", AUGMENTED) else "fp32"


def cached_features(clf: Classifier, spec: ModelSpec, split_dir: Path, cache: FeatureCache, *, batch_size: int,
                    rt: Runtime, augmented_dir: Path | None = None) -> tuple[dict[str, TensorSet], float]:
    """Features of every split, and of the augment stage's copies (``augmented``) when
    ``augmented_dir`` is given: from ``cache`` where its record matches, else computed once and
    written there. Returns (sets, images/s of what was computed, 0 when all was reused)."""
    trunk = Trunk(clf).eval().to(rt.device)
    if rt.channels_last:
        trunk.to(memory_format=torch.channels_last)
    digest = trunk_digest(clf, arch=spec.arch, mode=spec.mode, image_size=spec.image_size)
    sets, seconds, count = {}, 0.0, 0
    manifests = {split: split_dir / f"{split}.csv" for split in SPLITS}
    if augmented_dir is not None:
        manifests[AUGMENTED] = augmented_dir / "train.csv"
    for split, manifest in manifests.items():
        record = {"trunk": digest, "manifest": manifest_digest(manifest), "precision": split_precision(split, rt)}
        hit = cache.load(split, record)
        if hit is not None:
            print(f"reusing cached {split} features in {cache.folder}")
            sets[split] = TensorSet(*hit)
            continue
        images = load_split(manifest.parent, "train" if split == AUGMENTED else split, mode=spec.mode,
                            size=spec.image_size)
        t0 = time.perf_counter()
        feats = predict_logits(trunk, images.images, batch_size=batch_size, device=rt.device,
                               precision=record["precision"], channels_last=rt.channels_last)
        seconds += time.perf_counter() - t0
        count += len(images)
        cache.save(split, record, feats, images.labels)
        sets[split] = TensorSet(feats, images.labels)
    return sets, count / seconds if seconds else 0.0


def check_assembly(clf: Classifier, spec: ModelSpec, split_dir: Path, val_features: torch.Tensor, *,
                   rt: Runtime, sample: int = 32) -> float:
    """The head put back on the backbone must give what the head gave on the cached features
    (checked on ``sample`` validation images, fp32); returns the largest logit difference."""
    images = load_split(split_dir, "val", mode=spec.mode, size=spec.image_size, limit=sample).images
    whole = predict_logits(clf, images, batch_size=sample, device=rt.device, channels_last=rt.channels_last)
    head = predict_logits(clf.net.head, val_features[:len(images)], batch_size=sample, device=rt.device)
    diff = float((whole - head).abs().max()) if len(images) else 0.0
    if diff > 1e-3 * max(1.0, float(head.abs().max())):
        raise RuntimeError(f"the assembled model's logits differ from its head's on cached features by {diff:.3g}; "
                           "the feature cache is out of step with the backbone: delete data/features and re-run")
    return diff


@dataclass(frozen=True)
class FeatureExtractConfig:
    backbone: str
    weights: str | None
    image_size: int
    extract_batch_size: int
    precision: str  # of the training split's extraction pass ("auto" resolves per machine)
    channels_last: bool
    head_dropout: float
    head_hidden: int | None
    device: str = "auto"
    tf32: bool = True


def feature_extract(
    *, variant: str, split_dir: Path, augmented_dir: Path | None, cache_dir: Path, fx: FeatureExtractConfig,
    head_cfg: TrainParams, seed: int, experiment: str, logged_params: dict[str, Any], out: TrainOutputs,
) -> dict[str, Any]:
    """The `feature_extract@<variant>` stage: cached backbone features, a head trained on them, one
    MLflow run. With ``augmented_dir`` (the lesson's second frozen-base recipe, "feature extraction
    with data augmentation") the head trains on the features of the augment stage's copies too,
    one version of each image per epoch, as the from-scratch nets do; the copies' features are
    computed once and cached like the others."""
    rt = resolve_runtime(device=fx.device, precision=fx.precision, channels_last=fx.channels_last, tf32=fx.tf32)
    print(f"feature_extract@{variant}: {rt.describe()}", file=sys.stderr)
    logged_params = {**logged_params, **rt.params()}
    torch.manual_seed(seed)
    spec = backbone_spec(split_dir, backbone=fx.backbone, weights=fx.weights, image_size=fx.image_size,
                         dropout=fx.head_dropout, hidden=fx.head_hidden)
    clf = build_pretrained_classifier(spec)
    sets, extract_rate = cached_features(clf, spec, split_dir, FeatureCache(cache_dir),
                                         batch_size=fx.extract_batch_size, rt=rt, augmented_dir=augmented_dir)
    if augmented_dir is None:
        train = TrainSet(sets["train"].images, sets["train"].labels, torch.arange(len(sets["train"]))[:, None])
    else:  # the rows in train_versions' order: originals, then the copies
        copies = sets[AUGMENTED]
        train = TrainSet(torch.cat([sets["train"].images, copies.images]),
                         torch.cat([sets["train"].labels, copies.labels]), train_versions(split_dir, augmented_dir)[2])
    head_rt = resolve_runtime(device=rt.device.type, precision=head_cfg.precision,
                              channels_last=head_cfg.channels_last, tf32=head_cfg.tf32)
    with tracked_run(experiment=experiment, run_name=variant,
                     tags={"variant": variant, "kind": "feature_extract", "stage": f"feature_extract@{variant}",
                           **rt.tags()},
                     params=logged_params) as run:
        result = fit(clf.net.head, train, sets["val"], head_cfg, seed=seed, runtime=head_rt,
                     checkpoint=out.checkpoint,
                     fingerprint=params_hash({"params": logged_params, "features": [
                         files_digest(cache_dir / f"{s}.pt") for s in sets if s != "test"]}),
                     on_epoch=lambda row: mlflow.log_metrics({k: v for k, v in row.items() if k != "epoch"},
                                                             step=int(row["epoch"])))
        # The head trained in place inside clf, so clf is now the complete image classifier.
        clf.to(rt.device)
        diff = check_assembly(clf, spec, split_dir, sets["val"].images, rt=rt)
        metrics, timing, run_info = record_variant(
            run, variant=variant, model=clf, spec=spec, result=result, out=out,
            experiment=experiment, title=f"{variant}: frozen {fx.backbone} + head",
            extra_metrics={"extract_images_per_second": extract_rate, "assembly_max_logit_diff": diff})
    out.checkpoint.unlink(missing_ok=True)
    return {**metrics, **timing, **run_info}
