"""Stage `fine_tune`: unfreeze the top blocks of the feature_extract model and train them."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs

from cnnlab.config import ConfigError
from cnnlab.finetune import FineTuneConfig, fine_tune


def main() -> None:
    args, params = parse(__doc__, "split", "train_data", "start_model", "model", "metrics", "history", "curves",
                         "checkpoint")
    p = params.fine_tune
    if args.train_data != p.train_data:
        raise ConfigError(f"--train-data {args.train_data} disagrees with fine_tune.train_data")
    split_dir = Path(args.split)
    result = fine_tune(
        split_dir=split_dir,
        augmented_dir=None if Path(args.train_data) == split_dir else Path(args.train_data),
        start_model=Path(args.start_model),
        ft=FineTuneConfig(unfreeze_blocks=p.unfreeze_blocks, block_lr_decay=p.block_lr_decay,
                          unfreeze_every=p.unfreeze_every, train_bn=p.train_bn,
                          cache_frozen=p.cache_frozen),
        cfg=p.train_params(),
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params={"seed": params.base.seed, "variant": "fine_tune", **p.model_dump()},
        out=train_outputs(args),
    )
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run", "train_seconds",
                                             "unfrozen", "run_id", "model_uri")}, indent=2))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError)
