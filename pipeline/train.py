"""Stage `train@<variant>`: train a from-scratch variant, log it to MLflow, write its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs

from cnnlab.config import ConfigError
from cnnlab.training import train_variant


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "train_data", "model", "metrics", "history", "curves",
                         "checkpoint")
    if args.variant not in params.variants:
        raise ConfigError(f"variants.{args.variant}: not in params.yaml (have: {', '.join(params.variants)})")
    v = params.variants[args.variant]
    if args.train_data != v.train_data:
        raise ConfigError(f"--train-data {args.train_data} disagrees with variants.{args.variant}.train_data")
    split_dir = Path(args.split)
    cfg = params.train.model_copy(update={"epochs": v.epochs or params.train.epochs})
    result = train_variant(
        variant=args.variant,
        split_dir=split_dir,
        augmented_dir=None if Path(args.train_data) == split_dir else Path(args.train_data),
        on_the_fly=v.on_the_fly,
        dropout=v.dropout,
        cfg=cfg,
        seed=params.base.seed,
        experiment=params.base.experiment,
        # What this run actually used: the shared train section with the variant's overrides.
        logged_params={"seed": params.base.seed, "variant": args.variant, "train": cfg.model_dump(),
                       **v.model_dump(exclude={"epochs"})},
        out=train_outputs(args),
    )
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run", "train_seconds",
                                             "run_id", "model_uri")}, indent=2))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError)
