"""Grad-CAM (cnnlab.evaluation.explain): the map lights up where the evidence for the class is."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cnnlab.evaluation.explain import grad_cam, last_conv


class BrightSpot(nn.Module):
    """Class 1 = "there is a bright patch", class 0 = its opposite: one 3x3 convolution that
    responds to brightness, global average pooling, and a linear head of fixed weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.head = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 9)
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[-1.0], [1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x.float() / 255)).mean(dim=(2, 3)))


def test_the_map_lights_the_evidence_for_the_class_and_nothing_for_its_opposite():
    images = torch.zeros(2, 1, 32, 32, dtype=torch.uint8)
    images[0, :, 4:12, 4:12] = 255  # top left
    images[1, :, 20:28, 18:26] = 255  # bottom right
    heat = grad_cam(BrightSpot(), images, [1, 1])
    assert heat.shape == (2, 32, 32) and heat.max() == pytest.approx(1.0)
    for h, (rows, cols) in zip(heat, ((slice(4, 12), slice(4, 12)), (slice(20, 28), slice(18, 26)))):
        inside = h[rows, cols].mean()
        outside = (h.sum() - h[rows, cols].sum()) / (h.size - h[rows, cols].size)
        assert inside > 0.5 and outside < 0.1
    # The opposite class has only negative evidence: ReLU leaves an all-zero map.
    assert np.all(grad_cam(BrightSpot(), images, [0, 0]) == 0)


def test_last_conv_is_found_and_a_net_without_one_is_refused():
    model = BrightSpot()
    assert last_conv(model) is model.conv
    with pytest.raises(ValueError, match="no Conv2d"):
        last_conv(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))
