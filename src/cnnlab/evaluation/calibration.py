"""Calibrated confidence: temperature scaling, expected calibration error, reliability bins.

Pure numpy / scipy on log-probabilities (N, K) and integer labels (N,), so a single net (its
log-softmax) and the ensemble (the log of its mean probabilities) are treated the same way.

Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017) divides the
log-probabilities by one number T fitted on held-out data by minimising the negative log-likelihood
(here with a weak prior on log T, which matters only on a few dozen images).
T > 1 softens an over-confident model. Dividing every score of an image by the same positive number
keeps their order, so the predicted class, hence accuracy and every McNemar test, is unchanged.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# 15 equal-width confidence bins: the usual choice since Guo et al. (and the probe).
ECE_BINS = 15
# Search range of T: beyond it a model is not "mis-calibrated" but broken (or T is meaningless,
# e.g. on a validation split the model gets all right, where the NLL keeps falling as T -> 0).
T_MIN, T_MAX = 0.05, 20.0
# A weak prior on log T, centred on T = 1 (the model as trained): its weight falls as 1/n, so on a
# thousand calibration images it moves T by a few percent, while on a few dozen that a model gets
# nearly all right (a small photo folder: 1 mistake in 61) it keeps T from collapsing towards
# T_MIN, where the NLL on those images still falls but on new ones rises fourfold.
LOG_T_PRIOR_SD = 0.5


def log_probabilities(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64: logits, or log-probabilities (which it leaves as they are)."""
    return log_softmax(np.asarray(scores, dtype=np.float64), axis=1)


def scaled(log_probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities after temperature scaling: softmax(log p / T)."""
    return np.exp(log_probabilities(np.asarray(log_probs, dtype=np.float64) / temperature))


def nll(log_probs: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class after scaling by ``temperature``."""
    lp = log_probabilities(np.asarray(log_probs, dtype=np.float64) / temperature)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_objective(log_probs: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """What `fit_temperature` minimises: the mean NLL at ``temperature`` plus the prior's
    (log T)^2 / (2 sd^2 n), i.e. the negative log-posterior per image (LOG_T_PRIOR_SD)."""
    return nll(log_probs, labels, temperature) + np.log(temperature) ** 2 / (2 * LOG_T_PRIOR_SD ** 2 * len(labels))


def fit_temperature(log_probs: np.ndarray, labels: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] that minimises `fit_objective` for ``labels`` (bounded Brent on
    log T): the NLL's minimum on many images, pulled towards 1 on a few.

    Deterministic: the same inputs give the same T to the last bit.
    """
    log_probs, labels = np.asarray(log_probs, dtype=np.float64), np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        raise ValueError("fit_temperature: no examples")
    found = minimize_scalar(lambda log_t: fit_objective(log_probs, labels, float(np.exp(log_t))), method="bounded",
                            bounds=(np.log(T_MIN), np.log(T_MAX)), options={"xatol": 1e-6})
    return float(np.exp(found.x))


def at_bound(temperature: float) -> bool:
    """True when a fitted T ended within 10% of the search range's ends: the validation split gave
    no real minimum (all right, or tiny), and the T it gave means little."""
    return temperature < 1.1 * T_MIN or temperature > T_MAX / 1.1


def reliability(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> pd.DataFrame:
    """One row per non-empty confidence bin: its bounds, image count, mean confidence (the top
    probability) and accuracy. Bins are [k/bins, (k+1)/bins), the last one closed at 1."""
    probs = np.asarray(probs, dtype=np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(labels)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    rows = []
    for k in np.unique(index):
        member = index == k
        rows.append({"bin": int(k), "lower": k / bins, "upper": (k + 1) / bins, "count": int(member.sum()),
                     "confidence": float(confidence[member].mean()), "accuracy": float(correct[member].mean())})
    return pd.DataFrame(rows, columns=["bin", "lower", "upper", "count", "confidence", "accuracy"])


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width bins."""
    table = reliability(probs, labels, bins)
    weights = table["count"] / table["count"].sum()
    return float((weights * (table["confidence"] - table["accuracy"]).abs()).sum())
