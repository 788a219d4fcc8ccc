"""The whole pipeline on all of Fashion-MNIST: each stage's wall time and each variant's test
accuracy beside the published figures.

    .venv/bin/python bench/full_data.py                       # caps null: 51,000 / 9,000 / 10,000 images
    .venv/bin/python bench/full_data.py --keep /tmp/full -S fine_tune.epochs=10

A project copy (bench/project_copy.py) with ``split.max_*_per_class: null`` runs ``dvc repro``
one stage at a time, in pipeline order, each timed as a whole command (DVC's own work included),
so a stage's time is what a user waits for it. ``-S section.key=value`` changes a param first
(YAML values). Then it prints the test accuracy of every variant and the ensemble with its 95%
interval, beside zalandoresearch/fashion-mnist's table. Hours on a 2-core CPU: run it on an idle
machine, and quote the machine kind with the output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from project_copy import copy_project, project_params, tool_argv, tool_env

from cnnlab.config import parse_params

# zalandoresearch/fashion-mnist README, "Benchmark": test accuracy on the 10,000 test images.
PUBLISHED = {"2-conv nets (with pooling, dropout, BN)": "87.6-93.2%", "VGG16 (26M parameters)": "93.5%",
             "ResNet18 (with augmentation)": "94.9%", "human": "83.5%"}
ALL = {"max_train_per_class": None, "max_val_per_class": None, "max_test_per_class": None}


def _setting(text: str) -> tuple[str, str, object]:
    key, _, value = text.partition("=")
    section, _, name = key.partition(".")
    if not (section and name and _):
        raise argparse.ArgumentTypeError(f"{text!r}: expected section.key=value")
    return section, name, yaml.safe_load(value)


def stages(params: dict) -> list[str]:
    """Every stage in an order DVC can run them one by one (kinds in dependency order)."""
    variants = parse_params(params).resolved_variants()
    return ["download", "split", "augment", *(v.stage for v in variants.values()), "evaluate", "register"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-S", dest="set", type=_setting, action="append", default=[], help="section.key=value")
    ap.add_argument("--keep", type=Path, help="keep the workspace here instead of a temporary folder")
    args = ap.parse_args()
    params = project_params(split=ALL)
    for section, name, value in args.set:
        params[section][name] = value
    with tempfile.TemporaryDirectory(prefix="cnnlab-full-") as tmp:
        ws = copy_project((args.keep or Path(tmp)) / "fmnist_all", params)
        logs = ws.parent / "logs"
        logs.mkdir(exist_ok=True)
        changed = ", ".join(f"{s}.{n}={v!r}" for s, n, v in args.set) or "none"
        print(f"caps null; other params changed: {changed}; stage output in {logs}\n", flush=True)
        print("| stage | wall s |\n|---|---:|", flush=True)
        total = 0.0
        for stage in stages(params):
            t0 = time.perf_counter()
            done = subprocess.run(tool_argv(["dvc", "repro", "--single-item", stage]), cwd=ws, env=tool_env(ws),
                                  capture_output=True, text=True, check=False)
            seconds = time.perf_counter() - t0
            (logs / f"{stage.replace('@', '_')}.log").write_text(done.stdout + done.stderr)
            if done.returncode:
                sys.exit(f"{stage} failed after {seconds:.0f} s in {ws}:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
            total += seconds
            print(f"| {stage} | {seconds:,.1f} |", flush=True)
        print(f"| all | {total:,.1f} |\n")
        split = json.loads((ws / "data/metrics/split.json").read_text())
        results = json.loads((ws / "data/metrics/evaluate.json").read_text())
        print(f"{split['train_images']:,} training, {split['val_images']:,} validation, {split['test_images']:,} "
              "test images\n\n| variant | test accuracy | 95% interval |\n|---|---:|---|")
        for name, r in results.items():
            if isinstance(r, dict) and "test_accuracy" in r:
                print(f"| {name} | {r['test_accuracy']:.2%} | {r['test_accuracy_ci_low']:.2%}-"
                      f"{r['test_accuracy_ci_high']:.2%} |")
        print("\n| published (zalandoresearch/fashion-mnist) | test accuracy |\n|---|---:|")
        for name, acc in PUBLISHED.items():
            print(f"| {name} | {acc} |")


if __name__ == "__main__":
    main()
