"""Stage `fine_tune@<variant>`: unfreeze the top blocks of a feature_extract variant's model and
train them."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs, variant

from cnnlab.config import ConfigError
from cnnlab.stages.fine_tune import FineTuneConfig, fine_tune
from cnnlab.tracking.store_errors import store_error
from cnnlab.training.distributed import relaunch
from cnnlab.variants import run_params


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "start_model", "model", "metrics", "history",
                         "curves", "checkpoint")
    v = variant(params, args.variant, "fine_tune")
    p = v.settings
    if Path(args.start_model).name != p.from_:
        raise ConfigError(f"--start-model {args.start_model} is not variants.fine_tune.{v.name}.from ({p.from_})")
    relaunch(params.distributed.nproc_per_node)  # under torchrun when > 1 (this process becomes it)
    result = fine_tune(
        variant=v.name,
        split_dir=Path(args.split),
        augmented_dir=Path(args.augmented) if p.train_data == "data/augmented" else None,
        start_model=Path(args.start_model),
        ft=FineTuneConfig(unfreeze_blocks=p.unfreeze_blocks, block_lr_decay=p.block_lr_decay,
                          unfreeze_every=p.unfreeze_every, train_bn=p.train_bn,
                          cache_frozen=p.cache_frozen),
        cfg=p.train_params(),
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params=run_params(v, params.resolved_variants(), params.base.seed),
        out=train_outputs(args),
    )
    if not result:  # not rank 0 of several
        return
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run", "train_seconds",
                                             "unfrozen", "run_id")}, indent=2))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
