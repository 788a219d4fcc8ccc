"""Split-conformal prediction sets (cnnlab.evaluation.conformal) on cases with a known answer."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from cnnlab.evaluation.conformal import (
    conformal_threshold,
    conformity_scores,
    coverage_and_size,
    prediction_sets,
)


def _calibrated_model(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are exactly right: each label is drawn from its own row."""
    rng = np.random.default_rng(seed)
    probs = softmax(rng.normal(0.0, 2.0, size=(n, 8)), axis=1)
    return probs, np.array([rng.choice(8, p=p) for p in probs])


@pytest.mark.parametrize("coverage", [0.8, 0.9, 0.95])
def test_sets_reach_the_coverage_on_new_images_and_not_far_beyond(coverage: float):
    probs, labels = _calibrated_model(2_000, seed=0)
    threshold = conformal_threshold(conformity_scores(probs, labels), coverage)
    test_probs, test_labels = _calibrated_model(20_000, seed=1)
    covered, size = coverage_and_size(prediction_sets(test_probs, threshold), test_labels)
    # 20,000 images: the coverage's standard error is ~0.002; the guarantee is >= coverage
    # (up to the calibration set's own luck, ~0.007 at n = 2,000).
    assert coverage - 0.015 <= covered.mean() <= coverage + 0.03
    # On a perfectly calibrated model the oracle set (top classes up to the coverage) has the same
    # coverage; the conformal one should not be much larger.
    _, oracle_size = coverage_and_size(prediction_sets(test_probs, coverage), test_labels)
    assert size <= oracle_size * 1.15 and 1.0 < size < 8.0


def test_threshold_sets_and_scores_on_a_hand_example():
    probs = np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    labels = np.array([0, 1, 1])
    # mass above the true class: none; 0.5; the 0.6 and the tied 0.2 (ties count above)
    assert conformity_scores(probs, labels).tolist() == pytest.approx([0.0, 0.5, 0.8])
    # n = 3: ceil(4 * 0.5) = 2nd smallest; 0.75 asks for the 3rd; 0.9 for a 4th: every class
    assert conformal_threshold([0.0, 0.5, 0.8], 0.5) == 0.5
    assert conformal_threshold([0.8, 0.0, 0.5], 0.75) == 0.8
    assert conformal_threshold([0.0, 0.5, 0.8], 0.9) == 1.0
    sets = prediction_sets(probs, 0.55)
    # row 0: above the 2nd class 0.6 > 0.55, so only the top; row 1: 0.5 <= 0.55 lets the 2nd in;
    # row 2: the first 0.2 (column 0, the stable order) has 0.6 above it: out
    assert sets.tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    assert prediction_sets(probs, 0.0).sum(axis=1).tolist() == [1, 1, 1]  # never empty
    assert prediction_sets(probs, 1.0).all()
    covered, size = coverage_and_size(sets, labels)
    assert covered.tolist() == [True, True, False] and size == pytest.approx(4 / 3)
    with pytest.raises(ValueError, match="coverage"):
        conformal_threshold([0.5], 1.0)
