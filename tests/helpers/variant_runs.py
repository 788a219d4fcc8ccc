"""Each trainable kind's stage run in-process on a tiny split, as its pipeline script runs it:
`train_scratch` (the scratch stage) and `extract_features` (the feature_extract stage)."""

from __future__ import annotations

from pathlib import Path

from cnnlab.config import FeatureExtractParams, HeadParams, RuntimeParams, ScratchParams, SplitParams
from cnnlab.stages.feature_extract import feature_extract
from cnnlab.stages.scratch import scratch
from cnnlab.stages.variant import VariantRun
from cnnlab.training.outputs import TrainOutputs

TINY = ScratchParams(epochs=2, batch_size=16, early_stopping_patience=None, arch="tinyvgg", image_size=28,
                     arch_kwargs={"hidden_units": 4})
SPLIT = SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=6, max_val_per_class=3,
                    max_test_per_class=2, max_image_pixels=10_000, max_side=None, color_mode="auto")


# The head trains on vectors: head_fit_params() makes it fp32 without channels_last.
FX = FeatureExtractParams(backbone="efficientnet_lite0", weights="default", image_size=32, batch_size=32,
                          runtime=RuntimeParams(precision="bf16", channels_last=True), head_dropout=0.5,
                          head_hidden=None, head=HeadParams(epochs=5, early_stopping_patience=None))


def train_scratch(split: Path, aug: Path | None, out_root: Path, variant: str = "regularized", *,
           cfg: ScratchParams = TINY, dropout: float = 0.5, on_the_fly: bool = False, seed: int = 0):
    """Train ``variant`` with the scratch stage: on the split alone when ``aug`` is None, else on the
    split plus the augment stage's copies (or, ``on_the_fly``, on the originals augmented afresh)."""
    out = TrainOutputs(model_dir=out_root / "model", metrics=out_root / "metrics.json",
                       history=out_root / "history.csv", curves=out_root / "curves.png",
                       checkpoint=out_root / "ckpt.pt")
    settings = ScratchParams.model_validate({**cfg.model_dump(), "dropout": dropout, "on_the_fly": on_the_fly,
                                             "train_data": "original" if aug is None else "augmented"})
    v = VariantRun(name=variant, kind="scratch", stage=f"scratch@{variant}", seed=seed, experiment="test",
                   logged_params={"variant": variant, "scratch": settings.model_dump()}, out=out)
    # with train_data original the augment folder is never read: one that does not exist says so
    augmented = aug if aug is not None else out_root / "no-augment-stage"
    return scratch(v, settings, split_dir=split, augmented_dir=augmented), out


def extract_features(split_dir: Path, root: Path, fx: FeatureExtractParams = FX, augmented: Path | None = None):
    """The stage on ``split_dir``; with ``augmented`` the head trains on those copies too (train_data: augmented)."""
    out = TrainOutputs(model_dir=root / "model", metrics=root / "metrics.json", history=root / "history.csv",
                       curves=root / "curves.png", checkpoint=root / "ckpt.pt")
    v = VariantRun(name="feature_extract", kind="feature_extract", stage="feature_extract@feature_extract", seed=0,
                   experiment="t", logged_params={"variant": "feature_extract"}, out=out)
    if augmented is not None:
        fx = fx.model_copy(update={"train_data": "augmented"})
    return feature_extract(v, fx, split_dir=split_dir, augmented_dir=augmented or root / "no-augmented",
                           cache_dir=root / "features"), out
