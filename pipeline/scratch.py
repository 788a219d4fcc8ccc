"""Stage `scratch@<variant>`: train a from-scratch variant, log it to MLflow, write its outputs."""

from __future__ import annotations

from pathlib import Path

from _common import parse, print_result, run, variant_run

from cnnlab.stages.scratch import scratch
from cnnlab.tracking.store_errors import store_error
from cnnlab.training.distributed import relaunch


def main() -> None:
    args, params = parse(__doc__, "variant", "split", "augmented", "model", "metrics", "history", "curves",
                         "checkpoint")
    v, settings = variant_run(args, params, "scratch")
    relaunch(params.distributed.nproc_per_node)  # under torchrun when > 1 (this process becomes it)
    print_result(scratch(v, settings, split_dir=Path(args.split), augmented_dir=Path(args.augmented)))


if __name__ == "__main__":
    run(main, FileNotFoundError, ValueError, explain=store_error)
