#!/usr/bin/env python
"""Served confidence on images the pipeline never used: accuracy, ECE and NLL before and after the
temperature, and the prediction sets' coverage, for every registered variant.

Run from the repository root after `make repro` (the default run: Fashion-MNIST with caps)::

    .venv/bin/python bench/calibration.py                 # every version in data/registry.json
    .venv/bin/python bench/calibration.py --limit 2000 --variants regularized fine_tune

Held-back images: the Fashion-MNIST test images (t10k) that data/split/test.csv does not hold
(the default caps use 500 of each class's 1,000). Each is encoded as the PNG the split stage
stores for IDX images and classified in this process by the registered pyfunc, as
`mlflow models serve` would (`mlflow.pyfunc.load_model`), once as registered and once with the
model config ``temperature: 1`` and ``conformal_threshold: 1`` (the model as trained). ECE: 15
equal-width bins of the served ``confidence``. Coverage: share of images whose ``prediction_set``
holds the true class, with a 95% Wilson interval. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cnnlab.data.idx import read_idx
from cnnlab.data.shards import read_manifest
from cnnlab.evaluation.calibration import expected_calibration_error

FASHION = Path("/usr/share/datasets/fashion-mnist")


def held_back(split_dir: Path, limit: int | None) -> tuple[list[bytes], np.ndarray]:
    """t10k images not in the test split, as PNG bytes, and their labels (IDX order)."""
    used = {int(r["source"].rsplit("#", 1)[1]) for r in read_manifest(split_dir, "test")
            if "t10k" in r["source"]}
    images = read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    keep = [i for i in range(len(labels)) if i not in used][:limit]
    pngs = []
    for i in keep:
        buf = io.BytesIO()
        Image.fromarray(images[i], "L").save(buf, "PNG")
        pngs.append(buf.getvalue())
    return pngs, labels[keep]


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def measure(uri: str, images: list[bytes], labels: np.ndarray, classes: list[str], config: dict | None) -> dict:
    import mlflow

    model = mlflow.pyfunc.load_model(uri, model_config=config)
    out = pd.concat([model.predict(pd.DataFrame({"image": images[s:s + 256]}, dtype=object))
                     for s in range(0, len(images), 256)], ignore_index=True)
    probs = np.array([[p[c] for c in classes] for p in out["probabilities"]])
    covered = np.array([classes[y] in s for y, s in zip(labels, out["prediction_set"])])
    p_true = np.clip(probs[np.arange(len(labels)), labels], 1e-15, 1.0)
    return {"accuracy": float((probs.argmax(1) == labels).mean()), "mean_confidence": float(probs.max(1).mean()),
            "ece": expected_calibration_error(probs, labels), "nll": float(-np.log(p_true).mean()),
            "coverage": float(covered.mean()), "coverage_ci": wilson(int(covered.sum()), len(covered)),
            "set_size": float(out["prediction_set"].map(len).mean()),
            "config": model.model_config}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", type=Path, default=Path("data/split"))
    ap.add_argument("--registry", type=Path, default=Path("data/registry.json"))
    ap.add_argument("--limit", type=int, default=None, help="at most this many held-back images")
    ap.add_argument("--variants", nargs="+", metavar="NAME", help="only these registered variants (default: all)")
    args = ap.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    from cnnlab.tracking.runs import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    registry = json.loads(args.registry.read_text())
    classes = json.loads((args.split / "classes.json").read_text())
    images, labels = held_back(args.split, args.limit)
    print(f"{len(images):,} held-back Fashion-MNIST test images (not in {args.split}/test.csv); "
          f"{platform.machine()}, {os.cpu_count()} cores; champion {registry['champion']}\n")
    print("| variant | version | T | accuracy | mean confidence | ECE as trained -> served | NLL as trained -> served "
          "| set coverage [95%] | set size |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for variant, version in registry["versions"].items():
        if args.variants and variant not in args.variants:
            continue
        uri = f"models:/{registry['model_name']}/{version}"
        served = measure(uri, images, labels, classes, None)
        raw = measure(uri, images, labels, classes, {"temperature": 1.0, "conformal_threshold": 1.0})
        lo, hi = served["coverage_ci"]
        mark = " (champion)" if variant == registry["champion"] else ""
        print(f"| {variant}{mark} | {version} | {served['config'].get('temperature', 1.0):.3f} | "
              f"{served['accuracy']:.2%} | {raw['mean_confidence']:.3f} -> {served['mean_confidence']:.3f} | "
              f"{raw['ece']:.4f} -> {served['ece']:.4f} | {raw['nll']:.4f} -> {served['nll']:.4f} | "
              f"{served['coverage']:.2%} [{lo:.2%}, {hi:.2%}] | {served['set_size']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
