"""Stage `feature_extract@<variant>`: transfer learning, the lesson's "fast feature extraction": a frozen ImageNet backbone runs once
per image, its pooled features are cached, and a small head trains on them (epochs then cost
almost nothing). The head is then put back on the backbone, so the logged model takes raw images
like every other variant.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from cnnlab.config import FeatureExtractParams
from cnnlab.data.shards import read_manifest
from cnnlab.data.split import resolve_image_size
from cnnlab.data.tensors import (
    TensorSet,
    TrainSet,
    check_copies_size,
    load_split,
    split_classes,
    split_mode,
    train_versions,
)
from cnnlab.utils.files import files_digest
from cnnlab.models.backbones import create_backbone
from cnnlab.models.classifier import Classifier, ModelSpec, build_pretrained_classifier
from cnnlab.stages.variant import Finished, Plan, VariantResult, VariantRun, run_variant
from cnnlab.training.distributed import World
from cnnlab.training.engine import FitResult, predict_logits
from cnnlab.training.features import FeatureCache, Trunk, manifest_digest, trunk_digest
from cnnlab.training.hardware import Runtime, runtime_of

_log = logging.getLogger(__name__)

# calibration: for evaluate, which fits temperatures on it (absent or empty with calibration_fraction 0)
SPLITS = ("train", "val", "calibration", "test")
# The augment stage's copies of the training images, for a head trained on augmented features.
AUGMENTED = "augmented"


def backbone_spec(split_dir: Path, cfg: FeatureExtractParams) -> ModelSpec:
    """Grey data keeps one channel, normalized with the mean of the backbone's three values."""
    _, info = create_backbone(cfg.backbone, weights=None)  # architecture facts only: no weights needed
    mode = split_mode(split_dir)
    mean, std = list(info.mean), list(info.std)
    if mode == "L":
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return ModelSpec(kind="pretrained", arch=cfg.backbone, classes=split_classes(split_dir), mode=mode,
                     image_size=resolve_image_size(cfg.image_size, split_dir, "feature_extract"), mean=mean, std=std,
                     kwargs={"dropout": cfg.head_dropout, "hidden": cfg.head_hidden, "weights": cfg.weights})


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
    manifests = {split: split_dir / f"{split}.csv" for split in SPLITS
                 if split != "calibration" or ((split_dir / "calibration.csv").exists()
                                               and read_manifest(split_dir, "calibration"))}
    if augmented_dir is not None:
        manifests[AUGMENTED] = augmented_dir / "train.csv"
    for split, manifest in manifests.items():
        record = {"trunk": digest, "manifest": manifest_digest(manifest), "precision": split_precision(split, rt)}
        hit = cache.load(split, record)
        if hit is not None:
            _log.info("reusing cached %s features in %s", split, cache.folder)
            sets[split] = TensorSet(*hit)
            continue
        if split == AUGMENTED:
            check_copies_size(manifest.parent, spec.image_size)
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


def feature_extract(v: VariantRun, cfg: FeatureExtractParams, *, split_dir: Path, augmented_dir: Path,
                    cache_dir: Path) -> VariantResult:
    """The `feature_extract@<variant>` stage: cached backbone features, a head trained on them, one
    MLflow run. With ``train_data: augmented`` (the lesson's second frozen-base recipe, "feature
    extraction with data augmentation") the head trains on the features of the augment stage's
    copies too, one version of each image per epoch, as the from-scratch nets do; the copies'
    features are computed once and cached like the others."""
    augmented = augmented_dir if cfg.train_data == "augmented" else None

    def prepare(rt: Runtime, world: World) -> Plan:
        spec = backbone_spec(split_dir, cfg)
        clf = build_pretrained_classifier(spec)
        sets, extract_rate = cached_features(clf, spec, split_dir, FeatureCache(cache_dir),
                                             batch_size=cfg.batch_size, rt=rt, augmented_dir=augmented)
        if augmented is None:
            train = TrainSet(sets["train"].images, sets["train"].labels, torch.arange(len(sets["train"]))[:, None])
        else:  # the rows in train_versions' order: originals, then the copies
            copies = sets[AUGMENTED]
            train = TrainSet(torch.cat([sets["train"].images, copies.images]),
                             torch.cat([sets["train"].labels, copies.labels]),
                             train_versions(split_dir, augmented)[2])
        head = cfg.head_fit_params()

        def finish(result: FitResult) -> Finished:
            # The head trained in place inside clf, so clf is now the complete image classifier.
            clf.to(rt.device)
            diff = check_assembly(clf, spec, split_dir, sets["val"].images, rt=rt)
            return Finished(clf, spec, f"{v.name}: frozen {cfg.backbone} + head",
                            {"extract_images_per_second": extract_rate, "assembly_max_logit_diff": diff})

        return Plan(trainee=clf.net.head, train=train, val=sets["val"], cfg=head,
                    runtime=runtime_of(head.runtime, device=rt.device.type),
                    data=[files_digest(cache_dir / f"{s}.pt") for s in sets if s != "test"], finish=finish)

    return run_variant(v, cfg.runtime, prepare, batch_size=cfg.batch_size, processes=False)
