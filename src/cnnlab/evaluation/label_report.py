"""evaluate's label check wired to files: which variant's cached features it uses, the CSV of
suspects and their grid (the method: `cnnlab.evaluation.label_check`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cnnlab.data.shards import read_manifest
from cnnlab.data.tensors import load_split
from cnnlab.evaluation.figures import plot_misclassified
from cnnlab.evaluation.label_check import (
    FOLDS,
    LabelIssues,
    find_label_issues,
    out_of_sample_probabilities,
)
from cnnlab.evaluation.trained import Trained, cached_features
from cnnlab.training.features import FeatureCache
from cnnlab.utils.files import atomic_write_text

_log = logging.getLogger(__name__)

LABEL_ISSUES = "label_issues"  # the label check's key in the metrics file


@dataclass(frozen=True)
class Suspects:
    """The label check's result, with what is needed to show it: the checked images' manifest rows
    (train, then val: ``n_train`` of them train) and the variant whose features it used."""

    issues: LabelIssues
    rows: list[dict]
    n_train: int
    variant: Trained
    split_dir: Path


def check_labels(variants: list[Trained], split_dir: Path, classes: list[str], *, seed: int,
                  features_dir: Path | None) -> Suspects | None:
    """cleanlab on out-of-sample probabilities of every training and validation image, from k-fold
    heads on the first feature_extract variant's cached features (`cnnlab.evaluation.label_check`).
    None (and a log line) when no variant has them."""
    for v in variants:
        cache = FeatureCache(features_dir / v.name) if features_dir and (features_dir / v.name).is_dir() else None
        # The training features were cached in the stage's own precision (bf16 where it is native).
        parts = [cached_features(v, split_dir, split, cache, ("fp32", "bf16", "fp16")) for split in ("train", "val")]
        if cache is None or any(p is None for p in parts):
            continue
        features = torch.cat([p[0] for p in parts]).float().numpy()
        labels = torch.cat([p[1] for p in parts]).numpy()
        t0 = time.perf_counter()
        probs = out_of_sample_probabilities(features, labels, seed=seed)
        if probs is None:
            _log.warning("label check: a class has fewer than 2 training + validation images; skipped")
            return None
        issues = find_label_issues(probs, labels, classes)
        _log.info("label check: %d likely label errors among %d training + validation images (%s's features, "
                  "%d-fold heads, %.1f s); data/evaluation/label_issues.csv", len(issues.indices), len(labels),
                  v.name, FOLDS, time.perf_counter() - t0)
        rows = [*read_manifest(split_dir, "train"), *read_manifest(split_dir, "val")]
        return Suspects(issues, rows, len(parts[0][1]), v, split_dir)
    _log.info("label check: no feature_extract variant with cached training and validation features; skipped")
    return None


def write_label_issues(suspects: Suspects, out: Path, plots: Path, *, show: int) -> None:
    """label_issues.csv (every suspect, most likely wrong first) and a grid of the first ``show``."""
    table, rows, n_train = suspects.issues.table, suspects.rows, suspects.n_train
    where = [("train", i) if i < n_train else ("val", i - n_train) for i in table["index"]]
    shown = table.assign(split=[w[0] for w in where], key=[rows[i]["key"] for i in table["index"]],
                         source=[rows[i]["source"] for i in table["index"]])
    columns = ["split", "key", "source", "given", "suggested", "p_given", "p_suggested", "label_quality"]
    atomic_write_text(out / "label_issues.csv", shown[columns].to_csv(index=False, lineterminator="\n",
                                                                      float_format="%.6g"))
    v, top = suspects.variant, shown.head(show)
    decoded = {split: load_split(suspects.split_dir, split, mode=v.spec.mode, size=v.spec.image_size).images
               for split in {w[0] for w in where[:show]}}
    images = np.stack([decoded[split][i].numpy() for split, i in where[:show]]) if show and where else np.zeros((0,))
    plot_misclassified(images, list(top["given"]), list(top["suggested"]), list(top["p_suggested"]),
                       plots / "label_issues.png",
                       title=f"Likely label errors (given -> suggested, p): {len(top)} of {len(table)}")
