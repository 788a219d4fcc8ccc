"""Likely label errors in the training and validation images, found with cleanlab.

A frozen backbone's cached features make out-of-sample predictions for every image cheap: k
logistic-regression heads, each trained on the other folds (seconds for thousands of images).
cleanlab's confident learning (Northcutt, Jiang & Chuang, JAIR 2021) then flags the images whose
given label the out-of-sample probabilities contradict, ranked by the probability of the given
label. It is a report for a person to check: nothing is dropped or relabelled.

cleanlab (well kept, made for exactly this) rather than a hand-written rule: its per-class
thresholds handle imbalanced classes and classes the model confuses, which a global cut-off on
p(given label) does not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

_log = logging.getLogger(__name__)

# 5 folds: each head sees 80% of the images, and 5 fits of a linear head take seconds.
FOLDS = 5


@dataclass(frozen=True)
class LabelIssues:
    """Suspects, most likely wrong first: row indices into the checked images, and their table."""

    indices: np.ndarray
    table: pd.DataFrame  # index, given, suggested, p_given, p_suggested, label_quality
    checked: int


def out_of_sample_probabilities(features: np.ndarray, labels: np.ndarray, *, seed: int) -> np.ndarray | None:
    """(N, K) probabilities of each image from a head that never saw it (stratified k-fold
    logistic regression on standardised features); None when a class has fewer than 2 images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(labels)
    folds = min(FOLDS, int(counts[counts > 0].min()))
    if folds < 2:
        return None
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500, C=0.1))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return cross_val_predict(head, np.asarray(features, dtype=np.float32), labels, cv=cv, method="predict_proba")


def find_label_issues(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> LabelIssues:
    """cleanlab's suspects among images with out-of-sample ``probs`` and given ``labels``, ranked
    by self-confidence (the probability of the given label, lowest first)."""
    from cleanlab.filter import find_label_issues as cleanlab_find
    from cleanlab.rank import get_label_quality_scores

    indices = np.asarray(cleanlab_find(labels, probs, return_indices_ranked_by="self_confidence"), dtype=np.int64)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    suggested = probs.argmax(axis=1)
    names = np.asarray(classes, dtype=object)
    table = pd.DataFrame({
        "index": indices, "given": names[labels[indices]], "suggested": names[suggested[indices]],
        "p_given": probs[indices, labels[indices]], "p_suggested": probs[indices, suggested[indices]],
        "label_quality": quality[indices],
    })
    return LabelIssues(indices=indices, table=table, checked=len(labels))
