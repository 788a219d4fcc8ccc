"""Evaluation-time preprocessing, shared by training's tensor cache and the served model.

Training and serving must see identical pixels, so both call `prepare` on a decoded image:
convert to the model's mode, resize the shorter side to the model's size, centre-crop a square.
Normalization is not done here: it lives inside the model (`Classifier`), so a served model
needs nothing but these steps. `prepare_array` needs only numpy and Pillow: the ONNX model serves
with it where torch is not installed, so torch is imported by `prepare` alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from PIL import Image

from cnnlab.data.images import convert_mode

if TYPE_CHECKING:
    import torch

Mode = Literal["L", "RGB"]


def prepare(image: Image.Image, *, mode: Mode, size: int) -> torch.Tensor:
    """A decoded L/RGB image -> uint8 tensor (C, size, size): shorter side resized, centre crop."""
    import torch

    return torch.from_numpy(prepare_array(image, mode=mode, size=size))


def prepare_array(image: Image.Image, *, mode: Mode, size: int) -> np.ndarray:
    """`prepare` as a numpy array (C, size, size), for code that must not need torch (serving)."""
    image = convert_mode(image, mode)
    w, h = image.size
    if (w, h) != (size, size):
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.Resampling.BILINEAR, reducing_gap=3.0)
        left, top = (nw - size) // 2, (nh - size) // 2
        image = image.crop((left, top, left + size, top + size))
    arr = np.array(image, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))
