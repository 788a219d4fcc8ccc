"""Frozen blocks computed once: fine_tune's shortcut for the blocks below the unfrozen ones.

Those blocks never change during fine-tuning, so their output for each image is the same every
epoch: compute it once (`prefix_outputs`), then train the rest of the net from it (`FromPrefix`
with the frozen modules swapped for Identity by `swap_prefix`). `prefix_cacheable` proves first,
on a few images, that the shortcut gives the whole net's logits.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from cnnlab.models.classifier import Classifier
from cnnlab.utils.progress import progress
from cnnlab.training.engine import autocast
from cnnlab.training.hardware import Runtime


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass once the frozen prefix's output is known."""

    def __init__(self, output: torch.Tensor) -> None:
        self.output = output


@torch.inference_mode()
def prefix_outputs(clf: Classifier, last_frozen: str, images: torch.Tensor, *, rt: Runtime,
                   batch_size: int = 32) -> torch.Tensor:
    """What the frozen prefix (normalization through ``last_frozen``) makes of each uint8 image,
    in eval mode: computed once, instead of once per epoch. The rest of the net is never run."""
    def stop(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        raise _Stop(output)

    handle = clf.net.features.get_submodule(last_frozen).register_forward_hook(stop)
    clf.eval().to(rt.device)
    out = []
    try:
        for start in progress(range(0, len(images), batch_size), desc=f"frozen blocks up to {last_frozen}",
                              unit="batch"):
            x = images[start:start + batch_size].to(rt.device)
            if rt.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                with autocast(rt.device, rt.precision):
                    clf(x)
            except _Stop as done:
                out.append(done.output.cpu())
    finally:
        handle.remove()
    return torch.cat(out)


class FromPrefix(nn.Module):
    """``clf`` run from its frozen prefix's output: the prefix modules are swapped for Identity
    while this wrapper is in use (`swap_prefix`), so its state dict holds the trained part only.
    ``net`` is the classifier's own net, so param groups and `before_epoch` work on it unchanged."""

    def __init__(self, clf: Classifier) -> None:
        super().__init__()
        self.net = clf.net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.net.features(x))


@contextmanager
def swap_prefix(clf: Classifier, frozen: list[str]) -> Iterator[None]:
    """Replace the frozen modules by Identity for the block, and put them back afterwards."""
    features = clf.net.features
    saved = {name: features.get_submodule(name) for name in frozen}
    try:
        for name in frozen:
            features.set_submodule(name, nn.Identity())
        yield
    finally:
        for name, module in saved.items():
            features.set_submodule(name, module)


# Cached prefix outputs live in memory; past this the frozen blocks run every epoch instead.
MAX_PREFIX_CACHE_BYTES = 4 << 30


def prefix_cacheable(clf: Classifier, frozen: list[str], sample: torch.Tensor, *, rt: Runtime,
                     images: int = 0) -> str | None:
    """Why the frozen prefix cannot be cached (None when it can): its output must not depend on
    train/eval mode (no dropout), running the net from it must give the whole net's logits, and
    the outputs for ``images`` images must fit in `MAX_PREFIX_CACHE_BYTES`."""
    if not frozen:
        return "no block is frozen"
    cached = prefix_outputs(clf, frozen[-1], sample, rt=rt)
    size = images * cached[0].numel() * cached.element_size()
    if size > MAX_PREFIX_CACHE_BYTES:
        return f"their outputs for {images:,} images would take {size / 2**30:.1f} GiB of memory"
    features = clf.net.features
    trained_mode = [m for name in frozen for m in features.get_submodule(name).modules()
                    if isinstance(m, (nn.Dropout, nn.Dropout2d)) or type(m).__name__ == "DropPath"]
    if any(getattr(m, "p", getattr(m, "drop_prob", 0.0)) for m in trained_mode):
        return "a frozen block has dropout, which is random in training mode"
    x = sample.to(rt.device)
    if rt.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Under the precision training runs at, as prefix_outputs ran: with bf16 the cached outputs
    # are bf16, which only autocast lets into fp32 weights (and the whole net rounds the same way).
    with torch.inference_mode(), autocast(rt.device, rt.precision):
        whole = clf.eval()(x).float().cpu()
        with swap_prefix(clf, frozen):
            part = FromPrefix(clf).eval()(cached.to(rt.device)).float().cpu()
    # A net that is not a chain of its blocks is far off; bf16/fp16 rounding (8/11 bits) is not.
    tol = 1e-3 if rt.precision == "fp32" else 3e-2
    if not torch.allclose(whole, part, rtol=tol, atol=tol * max(1.0, float(whole.abs().max()))):
        return "the backbone's forward is not a chain of its blocks"
    return None
