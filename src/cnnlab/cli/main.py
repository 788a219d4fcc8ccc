"""``python -m cnnlab COMMAND``: the project's command line (argparse subcommands; add more here).

``predict PATH... [--model URI] [--json] [--explain]`` classifies image files with a logged pyfunc, locally:
no server, the same model `mlflow models serve` would load. Exit status: 0 when every file was
classified, 1 when any file failed (each gets its own error line; the rest are still
classified), 2 for a usage problem or a model that cannot be loaded.

``inspect PATH [--params PATH] [--json]`` prints the data report of a folder or an archive
(`cnnlab.cli.inspect`) without touching ``data/``.

``doctor [--params PATH] [--json]`` says what this machine is and what each stage resolves to on
it (`cnnlab.cli.doctor`); exit status 1 when something the default run needs is missing.

The team's tracking stack is not part of the library: ``python -m cnnlab_stack``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cnnlab.cli.predict import (
    DEFAULT_MODEL_URI,
    IMAGE_EXTENSIONS,
    PARAMS_FILE,
    CliError,
    _as_json,
    default_model_uri,
    find_images,
    format_table,
    load_model,
    predict_files,
)
from cnnlab.utils.logs import configure


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    configure(logging.WARNING)  # the package's warnings; the commands print their own output
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cnnlab", description="The cnnlab command line.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="classify image files with a logged model",
        description="Classify image files (folders are searched recursively for "
        f"{', '.join(sorted(IMAGE_EXTENSIONS))}) with a logged cnnlab pyfunc.",
        epilog="Exit status: 0 all classified, 1 some file failed (the others are still "
        "classified), 2 usage error or model not loadable.",
    )
    predict.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="image file or folder")
    predict.add_argument(
        "--model",
        metavar="URI",
        help="model URI: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN/model or a local "
        "folder (default: models:/<registry.model_name>@<registry.alias> from ./params.yaml, "
        f"else {DEFAULT_MODEL_URI})",
    )
    predict.add_argument("--json", action="store_true", help="print one JSON object per file (JSON Lines)")
    predict.add_argument("--batch-size", type=_positive_int, default=64, metavar="N", help="images per predict call")
    predict.add_argument("--explain", action="store_true",
                         help="also write a Grad-CAM overlay of the predicted class per file: where the net looked")
    predict.add_argument("--explain-dir", type=Path, default=Path("gradcam"), metavar="DIR",
                         help="folder for the overlays, <file name>.gradcam.png (default: ./gradcam)")
    predict.set_defaults(run=_run_predict)
    doctor = commands.add_parser(
        "doctor",
        help="check this machine and what each stage will run on",
        description="Versions, devices, each stage's resolved device and precision, the MLflow store, "
        "the default data and the offline weights.",
        epilog="Exit status: 0 the default run can go (warnings allowed), 1 a problem (each is listed "
        "with what to do).",
    )
    doctor.add_argument("--params", type=Path, default=PARAMS_FILE, metavar="PATH",
                        help="params file to resolve (default: ./params.yaml)")
    doctor.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    doctor.set_defaults(run=_run_doctor)
    inspect = commands.add_parser(
        "inspect",
        help="report on a folder or archive of images before any run",
        description="The data report the split stage writes (images per class and split, sizes and "
        "formats, duplicates, conflicting labels, leakage, what was skipped and why, what image_size: auto "
        "picks, how finely the test split can rank models), for a folder or an archive, writing nothing "
        "under data/.",
        epilog="Exit status: 0 report printed, 2 the path cannot be used (the message says why).",
    )
    inspect.add_argument("path", type=Path, metavar="PATH", help="folder of <class>/<image> or a .zip/.tar(.gz)")
    inspect.add_argument("--params", type=Path, default=PARAMS_FILE, metavar="PATH",
                         help="split settings and seed from this file (default: ./params.yaml, else the defaults)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.add_argument("--follow-outside-links", action="store_true",
                         help="follow links that lead out of the folder (download.follow_outside_links)")
    inspect.set_defaults(run=_run_inspect)
    return parser


def _run_predict(args: argparse.Namespace) -> int:
    files, errors = find_images(args.paths)
    uri = args.model or default_model_uri()
    # The model's log-time artifacts download draws progress bars on stderr: noise in a CLI.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if files:
        from cnnlab.serving.pyfunc import (
            limit_threads,  # torch: not for --help or usage errors
        )

        limit_threads()  # an entry point: this process is ours to tune
    model = load_model(uri) if files else None
    outcomes = list(errors)
    if args.json:
        for outcome in errors:
            print(json.dumps(_as_json(outcome)), flush=True)
        for outcome in predict_files(model, files, batch_size=args.batch_size):
            print(json.dumps(_as_json(outcome)), flush=True)  # streamed: a big folder shows progress
            outcomes.append(outcome)
    else:
        outcomes.extend(predict_files(model, files, batch_size=args.batch_size))
        print(format_table(outcomes))
    if args.explain and model is not None:
        from cnnlab.cli.predict import explain_files

        for written in explain_files(model, outcomes, args.explain_dir):
            print(f"wrote {written}", file=sys.stderr)
    failed = sum(o.error is not None for o in outcomes)
    if failed:
        print(f"{failed} of {len(outcomes)} path(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _run_doctor(args: argparse.Namespace) -> int:
    from cnnlab.cli.doctor import run  # torch and MLflow: not for --help

    return run(args.params, as_json=args.json)


def _run_inspect(args: argparse.Namespace) -> int:
    from cnnlab.cli.inspect import run

    return run(args.path, args.params, as_json=args.json, follow_outside=args.follow_outside_links)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
