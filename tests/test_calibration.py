"""Temperature scaling, ECE and reliability bins (cnnlab.evaluation.calibration) against cases with
a known answer, and the served model applying the temperature."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax

from cnnlab.evaluation.calibration import (
    T_MIN,
    expected_calibration_error,
    fit_temperature,
    log_probabilities,
    nll,
    reliability,
    scaled,
)
from cnnlab.evaluation.scoring import score


def _overconfident(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from softmax(z), and the logits a model `temperature` times too sure gives:
    z * temperature. The calibrated answer is known: T = `temperature`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, size=(n, 5))
    labels = np.array([rng.choice(5, p=p) for p in softmax(z, axis=1)])
    return z * temperature, labels


def test_fitted_temperature_recovers_the_over_confidence_and_lowers_nll_and_ece():
    logits, labels = _overconfident(20_000, 3.0, seed=0)
    lp = log_probabilities(logits)
    t = fit_temperature(lp, labels)
    assert t == pytest.approx(3.0, rel=0.05)
    assert nll(lp, labels, t) < 0.8 * nll(lp, labels)
    before, after = expected_calibration_error(np.exp(lp), labels), expected_calibration_error(scaled(lp, t), labels)
    assert after < 0.02 and before > 0.1
    # T is fitted on one half and helps on the other: what evaluate does with validation and test.
    held_out, held_labels = _overconfident(5_000, 3.0, seed=1)
    assert nll(held_out, held_labels, t) < 0.8 * nll(held_out, held_labels)


def test_a_calibrated_model_keeps_t_near_one_and_an_under_confident_one_gets_t_below_one():
    logits, labels = _overconfident(20_000, 1.0, seed=2)
    assert fit_temperature(log_probabilities(logits), labels) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(log_probabilities(logits / 2.0), labels) == pytest.approx(0.5, rel=0.05)


def test_temperature_never_changes_the_predicted_class():
    logits, labels = _overconfident(2_000, 3.0, seed=3)
    lp = log_probabilities(logits)
    for t in (0.05, 0.3, 1.0, 2.7, 20.0):
        np.testing.assert_array_equal(scaled(lp, t).argmax(1), lp.argmax(1))
    result = score("m", np.exp(lp), labels, classes=list("abcde"), bootstrap_samples=50, confidence=0.9, seed=0,
                   val_accuracy=0.5, parameters=1, temperature=2.7)
    np.testing.assert_array_equal(result.calibrated.argmax(1), result.predicted)
    assert result.test_loss_calibrated < result.test_loss and result.temperature == 2.7


def test_a_few_images_the_model_gets_right_do_not_collapse_the_temperature():
    """Every label right: the NLL alone keeps falling as T -> 0 (a small photo folder's 61
    calibration images with one mistake went to T = 0.089, and new images' NLL up fourfold). The
    prior on log T holds it near 1 on a few images and lets go on many."""
    logits = np.array([[2.0, 0.0], [0.0, 3.0]])
    lp, labels = log_probabilities(logits), np.array([0, 1])
    t = fit_temperature(lp, labels)
    assert 0.3 < t < 1.0  # sharper than as trained, far from the bound
    assert nll(lp, labels, T_MIN) < nll(lp, labels, t)  # the NLL alone would have gone to the bound
    many_lp, many_labels = np.tile(lp, (5_000, 1)), np.tile(labels, 5_000)
    assert fit_temperature(many_lp, many_labels) < t / 2  # 10,000 such images: the data weigh more
    small_logits, small_labels = _overconfident(60, 3.0, seed=4)
    assert fit_temperature(log_probabilities(small_logits), small_labels) > 1.5  # still softens a sure net
    with pytest.raises(ValueError, match="no examples"):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=int))


def test_ece_and_reliability_bins_on_a_hand_example():
    # Confidences 0.95 (right), 0.95 (wrong), 0.65 (right), 1.0 (right); bins of 1/10.
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.35, 0.65], [1.0, 0.0]])
    labels = np.array([0, 1, 1, 0])
    table = reliability(probs, labels, bins=10)
    assert list(table["bin"]) == [6, 9]  # 1.0 falls in the last bin, closed at 1
    assert list(table["count"]) == [1, 3]
    assert table["confidence"].tolist() == pytest.approx([0.65, (0.95 + 0.95 + 1.0) / 3])
    assert table["accuracy"].tolist() == pytest.approx([1.0, 2 / 3])
    # 1/4 * |0.65 - 1| + 3/4 * |0.9667 - 0.6667|
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.25 * 0.35 + 0.75 * 0.3)
    assert isinstance(table, pd.DataFrame)


def test_served_probabilities_are_the_logits_over_the_temperature(tmp_path):
    """`probabilities` (the pyfunc's forward pass) applies T: softmax(logits / T), same argmax."""
    from cnnlab.models.classifier import ModelSpec, build_classifier
    from cnnlab.serving.pyfunc import probabilities

    torch.manual_seed(0)
    spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=["a", "b", "c"], mode="L", image_size=28,
                     mean=[0.5], std=[0.25], kwargs={"hidden_units": 4})
    model = build_classifier(spec).eval()
    batch = torch.rand(6, 1, 28, 28)
    with torch.no_grad():
        logits = model(batch).double().numpy()
    got = probabilities(model, batch, 2.5).double().numpy()
    np.testing.assert_allclose(got, softmax(logits / 2.5, axis=1), atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), logits.argmax(1))
    assert not np.allclose(got, softmax(logits, axis=1), atol=1e-3)
