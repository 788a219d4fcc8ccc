"""``python -m cnnlab_stack up|down|status|env|dvc-remote``: the team's tracking stack on this
machine: PostgreSQL, SeaweedFS (S3) and an MLflow server with authentication (`cnnlab_stack.stack`).
``up`` prints the clients' variables as ``export`` lines (so does ``env``: ``eval "$(python -m
cnnlab_stack env)"``); ``status`` exits 0 only when all three are healthy; any failure is one
message and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return _run_stack(args)


def build_parser() -> argparse.ArgumentParser:
    stack = argparse.ArgumentParser(
        prog="python -m cnnlab_stack",
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
    return stack


def _run_stack(args: argparse.Namespace) -> int:
    import shlex
    import time

    from cnnlab_stack.stack import Stack, StackError

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


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0 (any free port) to 65535, got {value}")
    return value


if __name__ == "__main__":
    raise SystemExit(main())
