"""The seeds' architecture table, measured: every zoo network as a from-scratch variant on the
default data, through the real pipeline (`dvc repro evaluate` in a scratch copy of this repo with
bench/architectures.yaml as its `variants`), then one table: parameters, validation and test
accuracy with its interval, training time, epochs.

    .venv/bin/python bench/architectures.py              # ~30-60 min on a 2-core CPU
    .venv/bin/python bench/architectures.py --epochs 2   # a quick smoke run

Run it on an idle machine: the training times are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def workspace(root: Path, variants: dict, epochs: int | None) -> Path:
    ws = root / "ws"
    ws.mkdir(parents=True)
    for name in ("dvc.yaml", "params.yaml", "pipeline", "src", "data/local", ".dvcignore"):
        src = REPO / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, ws / name,
                                                            **({"ignore": shutil.ignore_patterns("__pycache__")}
                                                               if src.is_dir() else {}))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["variants"] = variants
    if epochs is not None:
        params["scratch"]["epochs"] = epochs
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run([BIN / "dvc", "init", "--no-scm", "-q"], cwd=ws, check=True)
    return ws


def table(ws: Path, names: list[str]) -> str:
    import mlflow

    comparison = {row["variant"]: row for row in _csv(ws / "data/evaluation/comparison.csv")}
    client = mlflow.MlflowClient(f"sqlite:///{ws}/mlflow.db")
    lines = ["| arch | parameters | val acc | test acc | 95% CI | best epoch / run | training time |",
             "| --- | --: | --: | --: | --- | --: | --: |"]
    for name in names:
        c, m = comparison[name], json.loads((ws / f"data/metrics/{name}.json").read_text())
        run = client.get_run(json.loads((ws / f"data/models/{name}/run.json").read_text())["run_id"])
        seconds = run.data.metrics["train_seconds"]
        lines.append(f"| `{name}` | {int(float(c['parameters'])):,} | {float(c['val_accuracy']):.2%} | "
                     f"{float(c['test_accuracy']):.2%} | [{float(c['ci_low']) * 100:.2f}, "
                     f"{float(c['ci_high']) * 100:.2f}] | {m['best_epoch']} / {m['epochs_run']} | {seconds:.0f} s |")
    return "\n".join(lines)


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", type=Path, default=REPO / "bench" / "architectures.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="override scratch.epochs (default: params.yaml's)")
    ap.add_argument("--keep", type=Path, default=None, help="run in this folder and keep it (default: a temp dir)")
    args = ap.parse_args()
    variants = yaml.safe_load(args.variants.read_text())["variants"]
    root = args.keep or Path(tempfile.mkdtemp(prefix="cnnlab-arch-"))
    ws = workspace(root, variants, args.epochs)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ws / "src"),
           "PYTHONDONTWRITEBYTECODE": ""}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.perf_counter()
    subprocess.run([BIN / "dvc", "repro", "evaluate"], cwd=ws, env=env, check=True)
    print(f"\ndvc repro evaluate: {time.perf_counter() - t0:.0f} s in {ws}\n")
    print(table(ws, list(variants["scratch"])))
    print()
    print((ws / "data/evaluation/comparison.md").read_text())
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
