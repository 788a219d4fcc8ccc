"""The training losses: cross-entropy (optionally smoothed) or focal, optionally class-weighted."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import FitParams
from cnnlab.data.report import AUTO_IMBALANCE


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): down-weights easy examples by (1 - p_t) ** gamma."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits, dim=1).gather(1, target[:, None]).squeeze(1)
        loss = -((1 - logp.exp()) ** self.gamma) * logp
        if self.weight is not None:
            w = self.weight[target]
            return (loss * w).sum() / w.sum()
        return loss.mean()


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (k * n_c), the scikit-learn "balanced" rule: rare classes weigh more."""
    counts = torch.bincount(labels, minlength=num_classes).float().clamp(min=1)
    return len(labels) / (num_classes * counts)


# `class_weights: auto` weighs the classes once the largest has AUTO_IMBALANCE times the smallest's
# images (the data report says whether it will): below it, weights mostly add noise to the loss;
# above it, an unweighted loss lets the net neglect the small classes (macro-F1 and per-class
# recall in evaluate show whether it helped).


def class_weights(rule: str, labels: torch.Tensor, num_classes: int) -> torch.Tensor | None:
    """The loss's per-class weights for ``rule`` ("none", "balanced", "auto") on these training
    labels (one per original image): None for an unweighted loss. "auto" is "balanced" when the
    largest class has at least `AUTO_IMBALANCE` times the smallest's images, else "none"."""
    if rule == "auto":
        counts = torch.bincount(labels, minlength=num_classes)
        rule = "balanced" if counts.max() >= AUTO_IMBALANCE * counts.min().clamp(min=1) else "none"
    return balanced_class_weights(labels, num_classes) if rule == "balanced" else None


def make_criterion(cfg: FitParams, weight: torch.Tensor | None) -> nn.Module:
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
