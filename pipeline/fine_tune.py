"""Stage `fine_tune@<variant>`: unfreeze the top blocks of a feature_extract variant's model and
train them."""

from __future__ import annotations

from pathlib import Path

from _common import parse, print_result, run, variant_run

from cnnlab.config import ConfigError
from cnnlab.stages.fine_tune import fine_tune
from cnnlab.tracking.store_errors import store_error
from cnnlab.training.distributed import relaunch


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "start_model", "model", "metrics", "history",
                         "curves", "checkpoint")
    v, settings = variant_run(args, params, "fine_tune")
    if Path(args.start_model).name != settings.from_:
        raise ConfigError(f"--start-model {args.start_model} is not variants.fine_tune.{v.name}.from "
                          f"({settings.from_})")
    relaunch(params.distributed.nproc_per_node)  # under torchrun when > 1 (this process becomes it)
    print_result(fine_tune(v, settings, split_dir=Path(args.split), augmented_dir=Path(args.augmented),
                           start_model=Path(args.start_model)))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
