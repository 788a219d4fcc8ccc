#!/usr/bin/env python
"""The served model on ONNX Runtime against PyTorch: in-process images/s and the serving environment.

Run from the repository root once `dvc repro` has registered the variants, on an idle machine::

    .venv/bin/python bench/runtimes.py                  # every variant, batch 1 and 32, both environments
    .venv/bin/python bench/runtimes.py --variants scratch fine_tune --seconds 5 --no-env

For each variant of params.yaml (the ensemble included) it gets that variant's pyfunc on each
runtime, as `register` logs it with ``serving.runtime: onnx`` or ``torch`` (`cnnlab.stages.register.
published`: the one already in the variant's run, else logged there now), and measures, side by
side in this one process:

* in-process images/s at batch 1 and at batch 32: ``mlflow.pyfunc.load_model(uri).predict`` on raw
  test images (decode, preprocessing, network, calibration, prediction sets), in a thread as the
  scoring server calls it, for ``--seconds`` each, the two runtimes alternating so that a change in
  the machine's load hits both; each runtime on its library's default threads, as in a user's
  process (the scoring server sets its own: docs/serving.md); and beside it the network alone
  (``session.run`` against the eager `Classifier`, same batch, no decoding or MLflow);
* the serving environment of the champion on each runtime (``--no-env`` skips it): what
  ``mlflow models serve --env-manager uv`` installs, i.e. its ``requirements.txt`` into an empty
  venv by uv from the warm cache: seconds to build, MB on disk, packages, and whether torch is in it.

It prints the figures and asserts nothing. `bench/serving_load.py --variant NAME --runtime onnx torch`
measures the same two pyfuncs behind `mlflow models serve`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
RUNTIMES = ("onnx", "torch")


def runtime_uris(variants: list[str] | None, runtimes: tuple[str, ...] = RUNTIMES,
                 params_file: Path = Path("params.yaml")) -> dict[tuple[str, str], str]:
    """(variant, runtime) -> the pyfunc URI, for ``variants`` (None: every one params.yaml declares)."""
    import mlflow

    from cnnlab.config import ServingParams, load_params
    from cnnlab.stages.register import published
    from cnnlab.tracking.runs import tracking_uri

    params = load_params(params_file)
    declared = params.resolved_variants()
    names = variants or list(declared)
    unknown = sorted(set(names) - set(declared))
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; params.yaml declares {sorted(declared)}")
    mlflow.set_tracking_uri(tracking_uri())
    out = {}
    for runtime in runtimes:
        serving = ServingParams(runtime=runtime, parity_images=params.serving.parity_images)
        candidates = published(
            Path("data/models"), Path("data/split"), Path("data/metrics/evaluate.json"),
            stages={n: declared[n].stage for n in names if declared[n].kind != "ensemble"},
            coverage=params.evaluate.coverage, tta=list(params.evaluate.tta),
            ensembles={n: declared[n].settings for n in names if declared[n].kind == "ensemble"},
            ensembles_file=Path("data/ensembles.json"), serving=serving)
        out.update({(c.variant, runtime): c.model_uri for c in candidates})
    return out


def images_per_s(model, images: list[bytes], batch: int, seconds: float) -> float:
    import pandas as pd

    frames = [pd.DataFrame({"image": images[i:i + batch]}, dtype=object)
              for i in range(0, len(images) - batch + 1, batch)]
    result = {}

    def loop() -> None:
        model.predict(frames[0])  # warm-up
        n, i, t0 = 0, 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.predict(frames[i % len(frames)])
            n, i = n + batch, i + 1
        result["rate"] = n / (time.perf_counter() - t0)

    t = threading.Thread(target=loop)
    t.start()
    t.join()
    return result["rate"]


def network_per_s(model, batch: int, seconds: float) -> dict[str, float]:
    """Images/s of the network alone (no decoding, no MLflow), eager PyTorch against ONNX Runtime, on a
    batch of uint8 zeros of the network's input shape; None for an ensemble (several networks)."""
    import numpy as np
    import torch

    onnx_model, torch_model = (m.unwrap_python_model() for m in model)
    if len(onnx_model._members) != 1:
        return {}
    member = onnx_model._members[0]
    x = np.zeros((batch, 1 if member.mode == "L" else 3, member.size, member.size), np.uint8)
    calls = {"onnx": lambda: member.session.run(None, {"image": x}),
             "torch": lambda: torch_model._model(torch.from_numpy(x))}
    out = {}
    with torch.inference_mode():
        for rt, call in calls.items():
            call()
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                call()
                n += batch
            out[rt] = n / (time.perf_counter() - t0)
    return out


def build_env(requirements: Path, folder: Path) -> tuple[float, float, int, bool]:
    """(seconds, MB, packages, torch in it) of a venv built from ``requirements`` by uv."""
    uv = shutil.which("uv", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if uv is None:
        raise SystemExit("uv is not installed (make setup installs it)")
    t0 = time.perf_counter()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(folder)], check=True)
    subprocess.run([uv, "pip", "install", "-q", "--python", str(folder / "bin" / "python"), "-r", str(requirements)],
                   check=True)
    seconds = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink()) / 1e6
    site = next(folder.glob("lib/python*/site-packages"))
    packages = len(list(site.glob("*.dist-info")))
    return seconds, size, packages, (site / "torch").exists()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", nargs="+", help="default: every variant params.yaml declares")
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement (default %(default)s)")
    ap.add_argument("--no-env", action="store_true", help="skip building the serving environments")
    args = ap.parse_args(argv)

    import mlflow

    from cnnlab.data.shards import iter_images

    uris = runtime_uris(args.variants)
    images = list(iter_images(Path("data/split"), "test", limit=256))
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    kind = ", ".join(f for f in ("avx512_bf16", "amx_tile", "avx2") if f in cpu) or "unknown"
    print(f"{os.cpu_count()} CPUs ({kind}); load average {os.getloadavg()[0]:.1f}; {args.seconds:.0f} s per cell",
          file=sys.stderr)
    lines = ["| variant | batch | ONNX Runtime img/s | PyTorch img/s | ONNX / PyTorch | network alone: ONNX / PyTorch |",
             "| --- | --: | --: | --: | --: | --: |"]
    for variant in dict.fromkeys(v for v, _ in uris):
        models = {rt: mlflow.pyfunc.load_model(uris[(variant, rt)]) for rt in RUNTIMES}
        for batch in (1, 32):
            rate = {rt: images_per_s(models[rt], images, batch, args.seconds) for rt in RUNTIMES}
            net = network_per_s([models["onnx"], models["torch"]], batch, args.seconds / 2)
            alone = (f"{net['onnx']:.0f} / {net['torch']:.0f} = {net['onnx'] / net['torch']:.2f}x" if net
                     else "(several networks)")
            lines.append(f"| {variant} | {batch} | {rate['onnx']:.1f} | {rate['torch']:.1f} | "
                         f"{rate['onnx'] / rate['torch']:.2f}x | {alone} |")
            print(lines[-1], file=sys.stderr, flush=True)
    if not args.no_env:
        registry = json.loads(Path("data/registry.json").read_text())
        measured = list(dict.fromkeys(v for v, _ in uris))
        champion = registry["champion"] if registry["champion"] in measured else measured[0]
        lines += ["", f"Serving environment of `{champion}` (its requirements.txt, built by uv from a warm cache):", "",
                  "| runtime | build s | MB on disk | packages | torch in it |", "| --- | --: | --: | --: | --- |"]
        with tempfile.TemporaryDirectory() as tmp:
            for rt in RUNTIMES:
                local = Path(mlflow.artifacts.download_artifacts(uris[(champion, rt)], dst_path=f"{tmp}/{rt}-model"))
                seconds, size, packages, torch_in = build_env(local / "requirements.txt", Path(tmp) / f"{rt}-env")
                lines.append(f"| {rt} | {seconds:.1f} | {size:.0f} | {packages} | {'yes' if torch_in else 'no'} |")
                print(lines[-1], file=sys.stderr, flush=True)
                shutil.rmtree(Path(tmp) / f"{rt}-env")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
