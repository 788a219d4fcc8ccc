"""Stage `train@<variant>`: train a from-scratch variant, log it to MLflow, write its outputs."""

from __future__ import annotations

import json
from pathlib import Path

from _common import parse, run, train_outputs, variant

from cnnlab.stages.train import train_variant
from cnnlab.tracking.store_errors import store_error
from cnnlab.training.distributed import relaunch
from cnnlab.variants import run_params


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "model", "metrics", "history", "curves",
                         "checkpoint")
    v = variant(params, args.variant, "scratch")
    relaunch(params.distributed.nproc_per_node)  # under torchrun when > 1 (this process becomes it)
    cfg = v.settings
    split_dir = Path(args.split)
    result = train_variant(
        variant=v.name,
        split_dir=split_dir,
        augmented_dir=Path(args.augmented) if cfg.train_data == "data/augmented" else None,
        on_the_fly=cfg.on_the_fly,
        dropout=cfg.dropout,
        cfg=cfg,
        seed=params.base.seed,
        experiment=params.base.experiment,
        logged_params=run_params(v, params.resolved_variants(), params.base.seed),
        out=train_outputs(args),
    )
    if not result:  # not rank 0 of several
        return
    print(json.dumps({k: result[k] for k in ("val_accuracy", "best_epoch", "epochs_run", "train_seconds",
                                             "run_id")}, indent=2))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
