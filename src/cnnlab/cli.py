"""``python -m cnnlab COMMAND``: the project's command line (argparse subcommands; add more here).

``predict PATH... [--model URI] [--json]`` classifies image files with a logged pyfunc, locally:
no server, the same model `mlflow models serve` would load. Exit status: 0 when every file was
classified, 1 when any file failed (each gets its own error line; the rest are still
classified), 2 for a usage problem or a model that cannot be loaded.

``doctor [--params PATH] [--json]`` says what this machine is and what each stage resolves to on
it (`cnnlab.doctor`); exit status 1 when something the default run needs is missing.

``stack up|down|status|env|dvc-remote [--dir DIR]`` runs the team's tracking stack on this
machine: PostgreSQL, SeaweedFS (S3) and an MLflow server with authentication (`cnnlab.stack`).
``up`` prints the clients' variables as ``export`` lines (so does ``env``: ``eval "$(python -m
cnnlab stack env)"``); ``status`` exits 0 only when all three are healthy; any failure is one
message and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnlab.data.images import IMAGE_EXTENSIONS

DEFAULT_MODEL_URI = "models:/cnnlab-classifier@champion"
PARAMS_FILE = Path("params.yaml")
TOP_K = 3


class CliError(Exception):
    """A problem the user fixes (model, params, arguments): printed as one message, exit 2."""


@dataclass(frozen=True)
class Outcome:
    """One file's result: ``prediction`` (label, label_id, confidence, probabilities) or ``error``."""

    path: Path
    prediction: dict[str, Any] | None = None
    error: str | None = None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
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
    _add_stack_parser(commands)
    return parser


def _add_stack_parser(commands: Any) -> None:
    stack = commands.add_parser(
        "stack",
        help="start/stop the team's MLflow server with PostgreSQL and S3 (SeaweedFS)",
        description="The team's tracking stack on this machine, all on 127.0.0.1: PostgreSQL, "
        "SeaweedFS (S3 bucket `cnnlab`) and an MLflow server with basic authentication. State "
        "(ports, generated secrets, pids, data, logs) under --dir.",
        epilog="Exit status: 0 done (status: all three healthy), 1 a problem (the message says "
        "what to do and which log to read).",
    )
    actions = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, metavar="DIR",
                       help="the stack's state folder (default: <repo root>/.stack, the repo root being "
                       "the nearest parent of the cwd holding dvc.yaml, else the cwd)")
    up = actions.add_parser(
        "up", parents=[where], help="start what is not running; print the client variables",
        description="Start PostgreSQL, SeaweedFS and MLflow (only the pieces not already running and "
        "healthy) and print the client variables as export lines.",
    )
    for option, piece, default in (
        ("--mlflow-port", "the MLflow server", 5000),
        ("--pg-port", "PostgreSQL", 15432),
        ("--s3-port", "the S3 endpoint (SeaweedFS's other ports follow it)", 8333),
    ):
        up.add_argument(option, type=_port, metavar="PORT",
                        help=f"port of {piece} (default: the saved one, else {default} when free, else any "
                        "free port; 0 = any free port)")
    actions.add_parser("down", parents=[where], help="stop all three (data, ports and secrets are kept)")
    actions.add_parser("status", parents=[where], help="each piece: running, pid, port, healthy")
    actions.add_parser("env", parents=[where], help="print the client variables as shell export lines")
    remote = actions.add_parser(
        "dvc-remote", parents=[where], help="make the stack's bucket the default DVC remote of the current repo",
        description="dvc remote add -d NAME s3://cnnlab/dvc with the stack's endpoint; the S3 keys go into "
        ".dvc/config.local only.",
    )
    remote.add_argument("--name", default="stack", help="the remote's name (default: stack)")
    stack.set_defaults(run=_run_stack)


def default_model_uri(params_file: Path = PARAMS_FILE) -> str:
    """The registry entry the register stage maintains, as named in ``params_file`` if present."""
    if not params_file.is_file():
        return DEFAULT_MODEL_URI
    from cnnlab.config import ConfigError, load_params

    try:
        registry = load_params(params_file).registry
    except ConfigError as e:
        raise CliError(f"{e}\n(fix it, or pass --model URI)") from None
    return f"models:/{registry.model_name}@{registry.alias}"


def find_images(paths: Sequence[Path]) -> tuple[list[Path], list[Outcome]]:
    """Files to classify (named files as given, folders' images sorted) and errors for the rest.

    A named file is used whatever its extension (the model decides whether it is an image); in
    folders only IMAGE_EXTENSIONS count. A missing path or a folder without images is an error.
    """
    files: list[Path] = []
    errors: list[Outcome] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if not found:
                errors.append(Outcome(path, error="folder holds no image files"))
        elif path.exists():
            found = [path]
        else:
            errors.append(Outcome(path, error="no such file or folder"))
            found = []
        for p in found:
            if p.resolve() not in seen:
                seen.add(p.resolve())
                files.append(p)
    return files, errors


def load_model(uri: str) -> Any:
    """Load the pyfunc at ``uri`` from the project's tracking store, or raise `CliError` saying why."""
    # Imported here: `--help` and argument errors should not wait for MLflow and torch.
    import mlflow
    from mlflow.exceptions import MlflowException

    from cnnlab.tracking import tracking_uri

    store = tracking_uri()
    mlflow.set_tracking_uri(store)
    if uri.startswith(("models:/", "runs:/")) and store.startswith("sqlite:///"):
        # MLflow would create an empty database here and then report the model missing.
        db = Path(store.removeprefix("sqlite:///"))
        if not db.is_file():
            raise CliError(
                f"cannot load {uri}: no tracking store at {db} (from {store}). Run from the "
                "repository root after `dvc repro`, set MLFLOW_TRACKING_URI, or pass --model "
                "with a local model folder."
            )
    try:
        return mlflow.pyfunc.load_model(uri)
    except (MlflowException, OSError) as e:
        reason = e.message if isinstance(e, MlflowException) else str(e)
        raise CliError(
            f"cannot load {uri} from {store}: {_first_line(reason)}\nTrain and register the "
            "model with `dvc repro` (from the repository root), or pass --model with an existing "
            "models:/, runs:/ or local folder URI."
        ) from None


def predict_files(model: Any, files: Sequence[Path], *, batch_size: int = 64) -> Iterator[Outcome]:
    """Classify ``files`` in batches with a loaded pyfunc; yields one `Outcome` per file, in order."""
    for start in range(0, len(files), batch_size):
        items: list[tuple[Path, bytes]] = []
        unreadable: dict[Path, Outcome] = {}
        for path in files[start : start + batch_size]:
            try:
                items.append((path, path.read_bytes()))
            except OSError as e:
                unreadable[path] = Outcome(path, error=f"cannot read: {e.strerror or e}")
        done = {o.path: o for o in _predict_items(model, items)} | unreadable
        for path in files[start : start + batch_size]:
            yield done[path]


def _predict_items(model: Any, items: list[tuple[Path, bytes]]) -> list[Outcome]:
    import pandas as pd
    from mlflow.exceptions import MlflowException

    if not items:
        return []
    try:
        frame = model.predict(pd.DataFrame({"image": [data for _, data in items]}, dtype=object))
    except MlflowException as e:
        if len(items) == 1:
            return [Outcome(items[0][0], error=_reason(e))]
        # One bad image fails its whole batch; one at a time tells which (bad files are rare).
        return [outcome for item in items for outcome in _predict_items(model, [item])]
    return [Outcome(path, prediction=row) for (path, _), row in zip(items, frame.to_dict("records"))]


def _reason(e: Exception) -> str:
    # cnnlab.serving.ServingError carries the reason alone; other errors get "row N: " cut.
    reason = getattr(e, "reason", None) or getattr(e, "message", None) or str(e)
    return re.sub(r"^row \d+: ", "", _first_line(reason))


def _run_predict(args: argparse.Namespace) -> int:
    files, errors = find_images(args.paths)
    uri = args.model or default_model_uri()
    # The model's log-time artifacts download draws progress bars on stderr: noise in a CLI.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if files:
        from cnnlab.serving import limit_threads  # torch: not for --help or usage errors

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
    failed = sum(o.error is not None for o in outcomes)
    if failed:
        print(f"{failed} of {len(outcomes)} path(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _run_doctor(args: argparse.Namespace) -> int:
    from cnnlab.doctor import run  # torch and MLflow: not for --help

    return run(args.params, as_json=args.json)


def _run_stack(args: argparse.Namespace) -> int:
    import shlex
    import time

    from cnnlab.stack import Stack, StackError

    started = time.monotonic()
    ports = {"mlflow": getattr(args, "mlflow_port", None), "postgres": getattr(args, "pg_port", None),
             "s3": getattr(args, "s3_port", None)}
    try:
        stack = Stack(args.dir, ports)
        if args.action == "up":
            stack.up()
        elif args.action == "down":
            stack.down()
            print(f"stack down (data, ports and secrets kept in {stack.dir})", file=sys.stderr)
            return 0
        elif args.action == "status":
            return _print_status(stack.status(), stack.dir)
        elif args.action == "dvc-remote":
            stack.configure_dvc_remote(args.name)
            print(f"DVC remote {args.name!r} (default): s3://cnnlab/dvc at {stack.s3.endpoint}; keys in "
                  ".dvc/config.local")
            return 0
        for key, value in stack.client_env().items():
            print(f"export {key}={shlex.quote(value)}")
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.action == "up":
        print(f"# stack up in {time.monotonic() - started:.1f} s; state, logs: {stack.dir}")
    return 0


def _print_status(status: dict[str, dict[str, Any]], folder: Path) -> int:
    print(f"{'PIECE':<10}  {'STATE':<8}  {'PID':>7}  {'PORT':>5}  HEALTHY")
    for name, s in status.items():
        state, pid = ("running", str(s["pid"])) if s["running"] else ("stopped", "-")
        print(f"{name:<10}  {state:<8}  {pid:>7}  {s['port'] or '-':>5}  {'yes' if s['healthy'] else 'no'}")
    print(f"(state and logs in {folder})")
    return 0 if all(s["healthy"] for s in status.values()) else 1


def format_table(outcomes: Sequence[Outcome], top_k: int = TOP_K) -> str:
    """Columns path, label, confidence, top-k classes; a failed file shows ``error: REASON``."""
    header = ("PATH", "LABEL", "CONFIDENCE", f"TOP-{top_k}")
    rows = []
    for o in outcomes:
        if o.prediction is None:
            rows.append((str(o.path), f"error: {o.error}"))
            continue
        probs = sorted(o.prediction["probabilities"].items(), key=lambda kv: -kv[1])[:top_k]
        top = ", ".join(f"{name} {p:.3f}" for name, p in probs)
        rows.append((str(o.path), str(o.prediction["label"]), f"{o.prediction['confidence']:.4f}", top))
    path_w = max(len(header[0]), *(len(r[0]) for r in rows)) if rows else len(header[0])
    label_w = max([len(header[1])] + [len(r[1]) for r in rows if len(r) == 4])
    lines = [f"{header[0]:<{path_w}}  {header[1]:<{label_w}}  {header[2]:>10}  {header[3]}"]
    for r in rows:
        if len(r) == 2:
            lines.append(f"{r[0]:<{path_w}}  {r[1]}")
        else:
            lines.append(f"{r[0]:<{path_w}}  {r[1]:<{label_w}}  {r[2]:>10}  {r[3]}")
    return "\n".join(lines)


def _as_json(o: Outcome) -> dict[str, Any]:
    if o.prediction is None:
        return {"path": str(o.path), "error": o.error}
    p = o.prediction
    return {
        "path": str(o.path),
        "label": str(p["label"]),
        "label_id": int(p["label_id"]),
        "confidence": float(p["confidence"]),
        "probabilities": {k: float(v) for k, v in p["probabilities"].items()},
    }


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
