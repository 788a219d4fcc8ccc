"""Test-time augmentation: the model also sees transformed copies of each image (e.g. mirrored),
and its answer is the mean of its probabilities over the views.

It costs one more forward pass per view, so `evaluate` turns it on for a model only where it helps
beyond noise on the validation split (exact McNemar test, the same as between variants) and
reports it on test either way; the served model applies what `evaluate` chose (model config
``tta``). Views are flips only: they keep every pixel, need no interpolation, and mirror images
are as likely as the originals for clothes and most photos (the augment stage's ``hflip`` says so
too). A data set where that is false (text, digits, left/right classes) sets ``evaluate.tta: []``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# SciPy and cnnlab.evaluation.scoring (scikit-learn) are imported inside the functions that need
# them: the served model imports this module for its views, and its environment should not.

VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda x: torch.flip(x, dims=[-1]),  # left-right mirror of (N, C, H, W)
}
# A view must beat the plain model at this level on validation to be used.
ALPHA = 0.05


def views(batch: torch.Tensor, names: Sequence[str]) -> list[torch.Tensor]:
    """The batch as it is, then each named view of it."""
    return [batch, *(VIEWS[n](batch) for n in names)]


def mean_log_probabilities(log_probs: Sequence[np.ndarray]) -> np.ndarray:
    """log of the mean of the views' probabilities (soft voting over views), computed stably."""
    from scipy.special import logsumexp

    stacked = np.stack([np.asarray(lp, dtype=np.float64) for lp in log_probs])
    return logsumexp(stacked, axis=0) - np.log(len(stacked))


def mean_probabilities(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The served form: the mean over views of softmax(logits), in float32."""
    return torch.stack([torch.softmax(lg.float(), dim=1) for lg in logits]).mean(dim=0)


@dataclass(frozen=True)
class Choice:
    """Whether a model is served with its views: only if they win on validation beyond noise."""

    views: tuple[str, ...]
    used: bool
    val_gain: float  # validation accuracy with the views minus without
    val_p: float  # exact McNemar p-value of that difference


def choose(names: Sequence[str], plain_correct: np.ndarray, tta_correct: np.ndarray) -> Choice:
    """Use the views when they are right more often on validation and McNemar's p < ALPHA."""
    from cnnlab.evaluation.scoring import mcnemar

    test = mcnemar(tta_correct, plain_correct)
    gain = float(np.mean(tta_correct) - np.mean(plain_correct))
    return Choice(views=tuple(names), used=bool(names) and gain > 0 and test.p_value < ALPHA, val_gain=gain,
                  val_p=test.p_value)

