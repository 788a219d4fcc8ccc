"""What every stage script shares: argument parsing and turning known errors into clean exits."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# On Apple's mps device an op Metal lacks runs on the CPU instead of stopping the stage; PyTorch
# prints a warning naming the op. It must be set before torch loads, hence here, in the entry point.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

from cnnlab.config import ConfigError, Params, load_params  # noqa: E402
from cnnlab.utils.logs import configure  # noqa: E402

if TYPE_CHECKING:
    from cnnlab.stages.variant import VariantResult, VariantRun

configure()  # the package's messages on stderr, where DVC shows them


def parse(description: str, *paths: str) -> tuple[argparse.Namespace, Params]:
    """``--params`` plus one required ``--<name>`` option per path the stage reads or writes."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--params", default="params.yaml", help="parameters file (default: %(default)s)")
    for name in paths:
        ap.add_argument(f"--{name.replace('_', '-')}", dest=name, required=True, help=f"{name} path")
    args = ap.parse_args()
    return args, load_params(args.params)


def run(main: Callable[[], None], *expected: type[BaseException],
        explain: Callable[[BaseException], str | None] | None = None) -> None:
    """Run ``main``; an expected error prints its message (no traceback) and exits with status 1,
    and so does any error ``explain`` puts in words (the MLflow stages pass
    `cnnlab.tracking.store_errors.store_error`). If the stage is killed (SIGKILL: nothing in it
    runs), a watcher removes the temp files it left under data/ (`cnnlab.utils.run_guard.watch_files`)."""
    from cnnlab.utils.run_guard import watch_files

    guard = watch_files(Path("data").resolve())
    try:
        _run(main, expected, explain)
    finally:
        guard.done()


def _run(main: Callable[[], None], expected: tuple[type[BaseException], ...],
         explain: Callable[[BaseException], str | None] | None) -> None:
    try:
        main()
    except (ConfigError, *expected) as exc:
        fail(str(exc))
    except Exception as exc:
        message = explain(exc) if explain else None
        if message is None:
            raise
        fail(message)


def fail(message: str) -> None:
    """One line on stderr, exit status 1: what went wrong and what to do, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def variant_run(args: argparse.Namespace, params: Params, kind: str) -> tuple[VariantRun, Any]:
    """The variant ``--variant`` names (dvc.yaml passes it), as `run_variant` takes it, with its
    resolved settings; its outputs come from the --model/--metrics/... options."""
    from cnnlab.stages.variant import VariantRun
    from cnnlab.training.outputs import TrainOutputs
    from cnnlab.tracking.run_params import run_params

    variants = resolve_auto_sizes(params.resolved_variants(), Path(args.split), say=args.variant)
    v = variants.get(args.variant)
    if v is None or v.kind != kind:
        have = ", ".join(n for n, o in variants.items() if o.kind == kind) or "none"
        raise ConfigError(f"variants.{kind}.{args.variant}: not in params.yaml (its {kind} variants: {have})")
    out = TrainOutputs(model_dir=Path(args.model), metrics=Path(args.metrics), history=Path(args.history),
                       curves=Path(args.curves), checkpoint=Path(args.checkpoint))
    run = VariantRun(name=v.name, kind=kind, stage=v.stage, seed=params.base.seed, experiment=params.base.experiment,
                     logged_params=run_params(v, variants, params.base.seed), out=out)
    return run, v.settings


def resolve_auto_sizes(variants: dict[str, Any], split_dir: Path, *, say: str) -> dict[str, Any]:
    """The variants with ``image_size: auto`` replaced by what the data report chose, so that the
    stage trains, and MLflow logs, the size used; said on stderr for variant ``say``."""
    from cnnlab.data.split import resolve_image_size

    out = {}
    for name, v in variants.items():
        s = v.settings
        if getattr(s, "image_size", None) == "auto":
            size = resolve_image_size("auto", split_dir, v.kind, quiet=name != say)
            s = s.model_copy(update={"image_size": size})
        out[name] = dataclasses.replace(v, settings=s)
    return out


def print_result(result: VariantResult | None) -> None:
    """A training stage's summary on stdout (nothing on torchrun ranks other than 0)."""
    if result is None:
        return
    keys = ("val_accuracy", "best_epoch", "epochs_run")
    print(json.dumps({**{k: result.metrics[k] for k in keys}, **result.timing, **result.summary,
                      "run_id": result.run_id}, indent=2))
