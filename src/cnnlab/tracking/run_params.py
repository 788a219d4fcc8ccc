"""What each variant's MLflow run logs as params: one naming scheme for every kind.

MLflow's compare view lines runs up by param name, so a setting that two kinds both have (the
learning rate, the batch size, the input size, the backbone or architecture) is logged under the
same flat key whatever the kind; what only one kind has (``unfreeze_blocks``, ``extract_batch_size``)
gets a key of its own, blank in the other runs' columns, as it should be.
"""

from __future__ import annotations

from typing import Any

from cnnlab.config import Variant

# Keys every run has, in this order (the compare view lists params alphabetically anyway).
COMMON = ("variant", "kind", "seed", "arch", "image_size", "train_data", "dropout", "epochs", "batch_size",
          "optimizer", "lr", "weight_decay", "scheduler", "early_stopping_patience", "precision", "device",
          "channels_last", "tf32")
_LOOP = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "scheduler", "early_stopping_patience")


def run_params(variant: Variant, variants: dict[str, Variant], seed: int) -> dict[str, Any]:
    """The fully resolved settings of ``variant`` as flat MLflow params (``tracking.flatten`` turns
    ``arch_kwargs`` into ``arch_kwargs.<key>``). ``variants`` resolves a fine_tune's ``from``.
    ``precision`` and ``device`` are as configured; each stage replaces them with what it resolved."""
    s = variant.settings
    out: dict[str, Any] = {"variant": variant.name, "kind": variant.kind, "seed": seed}
    if variant.kind == "scratch":
        out.update(_flat(s))
    elif variant.kind == "feature_extract":
        out.update(_backbone(s))
        out.update({k: getattr(s.head, k) for k in _LOOP}, label_smoothing=s.head.label_smoothing,
                   train_data=s.train_data, extract_batch_size=s.batch_size, **s.runtime.model_dump())
    else:  # fine_tune: the backbone, input size and head come from the variant it starts from
        start = variants[s.from_].settings
        out.update(_backbone(start))
        out.update(_flat(s))
    return {k: out[k] for k in COMMON} | {k: v for k, v in sorted(out.items()) if k not in COMMON}


def _flat(settings: Any) -> dict[str, Any]:
    """The section's keys, its runtime's among them: ``precision``, not ``runtime.precision``."""
    out = settings.model_dump(by_alias=True)
    return {**out, **out.pop("runtime")}


def _backbone(fx: Any) -> dict[str, Any]:
    return {"arch": fx.backbone, "weights": fx.weights, "image_size": fx.image_size, "dropout": fx.head_dropout,
            "head_hidden": fx.head_hidden}
