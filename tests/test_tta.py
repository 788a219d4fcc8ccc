"""Test-time augmentation (cnnlab.evaluation.tta): the choice on validation, the mean over views,
and the served model applying them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax

from cnnlab.evaluation.tta import (
    choose,
    mean_log_probabilities,
    mean_probabilities,
    views,
)
from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.serving.pyfunc import probabilities


def _correct(n: int, right: set[int]) -> np.ndarray:
    return np.isin(np.arange(n), sorted(right))


def test_views_are_used_only_when_they_win_on_validation_beyond_noise():
    plain = _correct(200, set(range(120)))
    better = _correct(200, set(range(5, 150)))  # 30 fixed, 5 broken: McNemar p ~ 1e-5
    slightly = _correct(200, set(range(2, 125)))  # 5 fixed, 2 broken: p ~ 0.45
    worse = _correct(200, set(range(100)))
    assert choose(["hflip"], plain, better).used
    assert choose(["hflip"], plain, better).val_gain == pytest.approx(0.125)
    assert not choose(["hflip"], plain, slightly).used and choose(["hflip"], plain, slightly).val_p > 0.05
    assert not choose(["hflip"], plain, worse).used
    assert not choose([], plain, better).used


def test_the_mean_over_views_is_the_mean_of_the_probabilities():
    rng = np.random.default_rng(0)
    a, b = log_softmax(rng.normal(size=(5, 4)), axis=1), log_softmax(rng.normal(size=(5, 4)), axis=1)
    np.testing.assert_allclose(np.exp(mean_log_probabilities([a, b])), (np.exp(a) + np.exp(b)) / 2, atol=1e-12)
    batch = torch.arange(2 * 1 * 2 * 3, dtype=torch.uint8).view(2, 1, 2, 3)
    mirrored = views(batch, ["hflip"])[1]
    assert torch.equal(mirrored[0, 0, 0], batch[0, 0, 0].flip(0))


def test_the_served_model_averages_the_image_and_its_mirror_before_the_temperature():
    torch.manual_seed(0)
    spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=["a", "b", "c"], mode="L", image_size=28,
                     mean=[0.5], std=[0.25], kwargs={"hidden_units": 4})
    model = build_classifier(spec).eval()
    batch = (torch.rand(4, 1, 28, 28) * 255).to(torch.uint8)
    with torch.no_grad():
        plain, flipped = model(batch).double().numpy(), model(batch.flip(-1)).double().numpy()
    mean = (softmax(plain, axis=1) + softmax(flipped, axis=1)) / 2
    want = softmax(np.log(mean) / 1.7, axis=1)
    got = probabilities(model, batch, 1.7, ["hflip"]).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(got, probabilities(model, batch, 1.7).double().numpy(), atol=1e-4)
    np.testing.assert_allclose(mean_probabilities([torch.from_numpy(plain), torch.from_numpy(flipped)]).numpy(),
                               mean, atol=1e-6)
