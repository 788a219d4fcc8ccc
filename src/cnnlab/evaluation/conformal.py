"""Split-conformal prediction sets: the classes an image may be, with a guaranteed coverage.

Adaptive prediction sets (APS, Romano, Sesia & Candes 2020; Angelopoulos & Bates, "A Gentle
Introduction to Conformal Prediction", 2021, section 2.1) in their deterministic form: an image's
set holds its classes from the most probable down while the classes above them hold at most a
threshold of probability together. A conformity score is the probability mass of the classes ranked
above the true one (0 when the model's top class is right), and the threshold is the
ceil((n + 1) * coverage)-th smallest score on n calibration images. If the calibration and test
images are exchangeable, a test image's set then holds its true class with probability at least
``coverage``. (APS's usual score also counts the true class's own mass; without its randomisation
that over-covers: 0.93 for a target of 0.8 on a test case here.) One class in the set: the model
is sure at that level; several: unsure.

Pure numpy (the served model computes sets with the same rule: `prediction_sets`). Written here
rather than taken from MAPIE or crepes: the method is a sort, a cumulative sum and a quantile, and
the served model must not depend on a training-side library.
"""

from __future__ import annotations

import math

import numpy as np


def conformity_scores(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's probability mass of the classes ranked above its true class."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(labels))
    true = probs[rows, labels]
    # Classes tied with the true one count as above it: the conservative side.
    return np.where(probs >= true[:, None], probs, 0.0).sum(axis=1) - true


def conformal_threshold(scores: np.ndarray, coverage: float) -> float:
    """The ceil((n + 1) * coverage)-th smallest score; 1.0 (every class) when n is too small for
    that coverage, i.e. (n + 1) * coverage > n."""
    if not 0.0 < coverage < 1.0:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    rank = math.ceil((len(scores) + 1) * coverage)
    return 1.0 if rank > len(scores) else float(scores[rank - 1])


def prediction_sets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """(N, K) bool: class k is in an image's set when the classes ranked above it hold at most
    ``threshold`` together. Never empty: the top class is always in."""
    probs = np.asarray(probs, dtype=np.float64)
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    before = np.cumsum(ranked, axis=1) - ranked  # mass of the classes ranked above each one
    # A small tolerance: the score that set the threshold came from the same sums in another order.
    keep = before <= threshold + 1e-12
    keep[:, 0] = True
    sets = np.zeros_like(keep)
    np.put_along_axis(sets, order, keep, axis=1)
    return sets


def coverage_and_size(sets: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, float]:
    """Per image, whether its set holds the true class; and the mean set size."""
    sets = np.asarray(sets, dtype=bool)
    return sets[np.arange(len(labels)), labels], float(sets.sum(axis=1).mean())
