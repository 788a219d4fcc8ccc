"""The label check (cnnlab.evaluation.label_check): labels flipped on purpose are found."""

from __future__ import annotations

import numpy as np

from cnnlab.evaluation.label_check import find_label_issues, out_of_sample_probabilities


def _clusters(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four well separated classes in 32 dimensions, like a backbone's features of easy images."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, size=(4, 32))
    labels = np.repeat(np.arange(4), per_class)
    return centres[labels] + rng.normal(0.0, 1.0, size=(len(labels), 32)), labels


def test_flipped_labels_are_found_first_and_the_rest_left_alone():
    features, truth = _clusters(100, seed=0)
    rng = np.random.default_rng(1)
    flipped = rng.choice(len(truth), size=12, replace=False)
    given = truth.copy()
    given[flipped] = (truth[flipped] + rng.integers(1, 4, size=12)) % 4  # always another class
    probs = out_of_sample_probabilities(features, given, seed=0)
    assert probs.shape == (400, 4) and np.allclose(probs.sum(axis=1), 1.0)
    issues = find_label_issues(probs, given, ["a", "b", "c", "d"])
    found = set(issues.indices.tolist())
    assert set(flipped.tolist()) <= found  # every flipped label
    assert len(found) <= 16  # and few others
    # Ranked: flipped ones first; the table names the given and the suggested (true) class.
    assert set(issues.indices[:12].tolist()) == set(flipped.tolist())
    row = issues.table.iloc[0]
    i = int(row["index"])
    assert row["given"] == "abcd"[given[i]] and row["suggested"] == "abcd"[truth[i]]
    assert row["p_given"] < 0.5 < row["p_suggested"] and issues.checked == 400


def test_clean_labels_give_no_suspects_and_tiny_classes_are_skipped():
    features, labels = _clusters(50, seed=2)
    probs = out_of_sample_probabilities(features, labels, seed=0)
    assert len(find_label_issues(probs, labels, list("abcd")).indices) == 0
    assert out_of_sample_probabilities(features[:101], labels[:101], seed=0) is None  # class 2 has one image
