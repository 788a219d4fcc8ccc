"""What every stage script shares: argument parsing and turning known errors into clean exits."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cnnlab.config import ConfigError, Params, load_params

if TYPE_CHECKING:
    from cnnlab.training import TrainOutputs


def parse(description: str, *paths: str) -> tuple[argparse.Namespace, Params]:
    """``--params`` plus one required ``--<name>`` option per path the stage reads or writes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, help=f"{name} path")
    args = ap.parse_args()
    return args, load_params(args.params)


def run(main: Callable[[], None], *expected: type[BaseException]) -> None:
    """Run ``main``; an expected error prints its message (no traceback) and exits with status 1."""
    try:
        main()
    except (ConfigError, *expected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def train_outputs(args: argparse.Namespace) -> TrainOutputs:
    """The outputs every training stage writes, from its --model/--metrics/... options."""
    from cnnlab.training import TrainOutputs

    return TrainOutputs(model_dir=Path(args.model), metrics=Path(args.metrics), history=Path(args.history),
                        curves=Path(args.curves), checkpoint=Path(args.checkpoint))
