"""Where in the image the net looked: Grad-CAM heat maps (Selvaraju et al., ICCV 2017).

Captum's `LayerGradCam` on the network's last convolution: the gradient of the explained class's
logit, averaged per channel, weights that layer's activations; the ReLU of the sum, upsampled to
the input, is the map. Captum (PyTorch's own interpretability library, light: torch, numpy,
matplotlib) rather than `grad-cam`, which pulls in OpenCV, or a hand-written hook.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnlab.models.classifier import Classifier


def last_conv(model: nn.Module) -> nn.Conv2d:
    """The last 2-D convolution in the model (module order): the most semantic layer that still
    has a spatial map. Every zoo net and backbone has one."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(model).__name__} has no Conv2d layer to explain")
    return convs[-1]


def grad_cam(model: Classifier, images: torch.Tensor, targets: np.ndarray | list[int], *,
             batch_size: int = 32) -> np.ndarray:
    """(N, H, W) maps in [0, 1] for ``images`` (uint8 (N, C, H, W), as the model reads them), each
    for its class in ``targets``; a map with no positive evidence is all zeros. fp32, on the CPU."""
    from captum.attr import LayerAttribution, LayerGradCam

    model = model.float().cpu().eval()
    cam = LayerGradCam(model, last_conv(model))
    height, width = images.shape[-2:]
    maps = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].float()
        target = torch.as_tensor(np.asarray(targets[start:start + batch_size]), dtype=torch.long)
        with torch.enable_grad():
            attribution = cam.attribute(batch, target=target, relu_attributions=True)
        maps.append(LayerAttribution.interpolate(attribution.detach(), (height, width), "bilinear")[:, 0])
    if not maps:
        return np.zeros((0, height, width), dtype=np.float32)
    out = torch.cat(maps).numpy().astype(np.float32)
    peak = out.reshape(len(out), -1).max(axis=1)
    return np.divide(out, peak[:, None, None], out=np.zeros_like(out), where=peak[:, None, None] > 0)


def save_overlay(image: np.ndarray, heat: np.ndarray, path: Path, *, title: str) -> None:
    """One image (uint8 (C, H, W)) beside itself with the map over it, as a PNG."""
    from matplotlib.figure import Figure

    from cnnlab.evaluation.figures import overlay_axes, save_figure

    fig = Figure(figsize=(6.4, 3.6))
    left, right = fig.subplots(1, 2)
    overlay_axes(left, image, None)
    overlay_axes(right, image, heat)
    left.set_title("input (as the model reads it)", fontsize=8)
    right.set_title("Grad-CAM", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
