#!/usr/bin/env python
"""Training throughput: this project's engine vs the lessons' ImageFolder + DataLoader loop.

Run from the repository root (the split must exist: `dvc repro split` or `make repro`)::

    .venv/bin/python bench/train_throughput.py                          # tinyvgg + simple_cnn, 3 epochs
    .venv/bin/python bench/train_throughput.py --repeats 3 --all-layouts   # steadier, + layout/precision split

For each model, the same architecture (same zoo builder, same init seed, so identical initial
weights), the same 2,000 training images, the same batch size and the same number of epochs
are trained, side by side in one process, by:

* baseline, num_workers=0: the lessons' way. ``torchvision.datasets.ImageFolder`` on
  the split's training images written out as
  ``<class>/<name>`` files + per-sample PIL transforms (Grayscale(1) for grey data,
  ToTensor, Normalize) + ``DataLoader(batch_size=64, shuffle=True, num_workers=0)`` + a plain
  fp32 loop (Adam, CrossEntropyLoss, ``loss.item()`` and an accuracy count every batch).
* baseline, num_workers=2: the same with two loader processes (a fairer baseline where worker
  processes are available; on a 2-core machine they compete with the training threads).
* engine fp32: ``cnnlab.training.engine.fit`` on the uint8 tensor cache, fp32, NCHW: the data-path gain.
* engine (params): the same with params.yaml's precision / memory layout, ``precision: auto``
  resolved as the scratch stage resolves it on this machine (bf16 only where the CPU has native
  bf16: AVX512-BF16 or AMX; else fp32): the data path plus the precision and layout gain.
* with ``--all-layouts``, every other cell of fp32/bf16 x NCHW/channels_last, which tells the
  layout's share of that gain from the precision's, and checks that the params row is within
  10% of the fastest cell (the default must be the fast choice on whatever CPU runs it).

The engine uses params.yaml's ``scratch`` section, with the choices that would make the two loops
train different things pinned to the baseline's: Adam, lr from params, no weight decay, no LR
schedule, cross-entropy, default init, no dropout, no early stopping.

Timed: the training epochs only (the baseline's loop over its DataLoader, which decodes PNGs
every epoch; the engine's own ``epoch_seconds``, which excludes its per-epoch validation).
Building the tensor cache is timed separately and reported once. images/s = training images
/ median epoch time over all epochs of all repeats (the first epoch carries one-off warm-up:
oneDNN kernel selection, allocator growth; the median keeps it from dominating).

Achieved FLOP/s = training FLOPs per image (3 x the forward FLOPs that
``torch.utils.flop_counter.FlopCounterMode`` counts for one batch, i.e. convolutions and
matmuls only) x images/s, shown as a fraction of a 2048x2048 matmul measured in the same run in
the matching precision (fp32 for the fp32 paths, bf16 for the bf16 paths; not shown where the
CPU only emulates bf16, whose peak is then measured on a 512x512 product to stay quick).

Threads: ``torch.set_num_threads(torch.get_num_threads())``, i.e. PyTorch's default, one
intra-op thread per core the process may use; both loops share it (DataLoader workers, when
there are any, run with one thread each, as PyTorch sets them). On a 2-core machine any other
busy process slows the two-thread paths unevenly, so the report says how much CPU other
processes took during the run and marks the goal verdict unreliable above 5%.

This is a benchmark to run by hand: it prints figures and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
import torch
import torchvision
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets, transforms

from cnnlab.config import ConfigError, ScratchParams, load_params
from cnnlab.data.shards import iter_images, read_manifest
from cnnlab.data.split import resolve_image_size
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, load_train, split_classes, split_mode
from cnnlab.training.engine import fit
from cnnlab.training.hardware import cpu_features, resolve_runtime
from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.models.zoo import create_model, list_models
from cnnlab.stages.scratch import channel_stats

ROOT = Path(__file__).resolve().parents[1]
GOAL = 4.0  # the project's goal: the engine at least 4x the baseline
PARAMS_GOAL = 0.10  # params.yaml's configuration (precision: auto) within 10% of the fastest engine row


def cfg_resolved_precision(params_path: Path) -> str:
    rt = load_params(params_path).scratch.runtime
    return resolve_runtime(device="cpu", precision=rt.precision, channels_last=rt.channels_last).precision


@dataclass
class PathResult:
    model: str
    path: str
    precision: str
    epoch_seconds: list[float] = field(default_factory=list)
    train_accuracy: list[float] = field(default_factory=list)  # last epoch of each repeat
    val_accuracy: list[float] = field(default_factory=list)  # last epoch of each repeat
    images: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / statistics.median(self.epoch_seconds)


# ------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine from /proc/stat (steal counts as busy)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def own_cpu_seconds() -> float:
    t = os.times()  # children: DataLoader workers, once joined
    return t.user + t.system + t.children_user + t.children_system


def matmul_peak(dtype: torch.dtype, n: int = 2048, warmup: int = 3, min_seconds: float = 1.5) -> float:
    """FLOP/s of an n x n matmul in ``dtype`` (2 n^3 per product), after ``warmup`` products.
    Callers pass a small ``n`` for a precision the CPU only emulates: a 2048 product then takes
    many seconds and the peak is a few GFLOP/s."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    c = torch.empty(n, n, dtype=dtype)
    for _ in range(warmup):
        torch.mm(a, b, out=c)
    iters, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b, out=c)
        iters += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and iters >= 3:
            return 2 * n**3 * iters / elapsed


def flops_per_image(arch: str, in_channels: int, num_classes: int, size: int, batch: int) -> tuple[float, float]:
    """(forward FLOPs per image, measured forward+backward FLOPs per image), counted on a
    throwaway copy of the architecture for one batch."""
    net = create_model(arch, in_channels=in_channels, num_classes=num_classes, image_size=size)
    x = torch.randn(batch, in_channels, size, size)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        net(x)
    net.train()
    with FlopCounterMode(display=False) as both:
        net(x).sum().backward()
    return fwd.get_total_flops() / batch, both.get_total_flops() / batch


# ----------------------------------------------------------------------------------- baseline


def baseline_transform(folder: Path, mode: str, size: int, mean: list[float], std: list[float]) -> transforms.Compose:
    """The lessons' per-sample pipeline. ImageFolder's loader converts to RGB, so grey data
    goes back to one channel with Grayscale(1). A Resize is added only if the PNGs are not
    already ``size`` x ``size`` (here they are, so the baseline is not charged for one)."""
    steps: list = []
    if mode == "L":
        steps.append(transforms.Grayscale(num_output_channels=1))
    first = next(p for p in sorted(folder.rglob("*.png")))
    with Image.open(first) as im:
        if im.size != (size, size):
            steps += [transforms.Resize(size), transforms.CenterCrop(size)]
    steps += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


def run_baseline(
    net: nn.Module, train_dir: Path, val_dir: Path, tfm, *, epochs: int, batch_size: int, workers: int,
    lr: float, seed: int, result: PathResult,
) -> None:
    """The lessons' train_step loop, fp32, NCHW, timed per epoch (DataLoader iteration included)."""
    torch.manual_seed(seed)  # the sampler's shuffle draws from the global generator
    train_ds = datasets.ImageFolder(str(train_dir), transform=tfm)
    loader = DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=workers)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    acc = 0.0
    for _ in range(epochs):
        net.train()
        train_loss, correct = 0.0, 0
        t0 = time.perf_counter()
        for x, y in loader:
            y_pred = net(x)
            loss = loss_fn(y_pred, y)
            train_loss += loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
            correct += (y_pred.argmax(dim=1) == y).sum().item()
        result.epoch_seconds.append(time.perf_counter() - t0)
        acc = correct / len(train_ds)
    result.images = len(train_ds)
    result.train_accuracy.append(acc)
    # Validation once at the end, the lessons' way (ImageFolder on the val folder), untimed.
    val_ds = datasets.ImageFolder(str(val_dir), transform=tfm)
    net.eval()
    correct = 0
    with torch.inference_mode():
        for x, y in DataLoader(val_ds, batch_size=256):
            correct += (net(x).argmax(1) == y).sum().item()
    result.val_accuracy.append(correct / len(val_ds))


# ------------------------------------------------------------------------------------- engine


def run_engine(model: nn.Module, train: TrainSet, val: TensorSet, cfg: ScratchParams, *, seed: int,
               verbose: bool, result: PathResult) -> None:
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())
    with sink:  # fit's progress bars go to stderr; its per-epoch lines are logged (shown with --verbose)
        fit_result = fit(model, train, val, cfg, seed=seed)
    result.epoch_seconds += [row["epoch_seconds"] for row in fit_result.history]
    result.train_accuracy.append(fit_result.history[-1]["train_accuracy"])
    result.val_accuracy.append(fit_result.history[-1]["val_accuracy"])
    result.images = len(train.versions)


def with_runtime(cfg: ScratchParams, **runtime: object) -> ScratchParams:
    """``cfg`` with some of its ``runtime`` keys (precision, channels_last, device, tf32) changed."""
    return ScratchParams(**{**cfg.model_dump(), "runtime": {**cfg.runtime.model_dump(), **runtime}})


def engine_params(params_path: Path, arch: str, epochs: int, batch_size: int) -> ScratchParams:
    base = load_params(params_path).scratch
    pinned = dict(
        arch=arch, arch_kwargs={}, epochs=epochs, batch_size=batch_size, optimizer="adam", weight_decay=0.0,
        scheduler="none", early_stopping_patience=None, loss="cross_entropy", label_smoothing=0.0,
        class_weights="none", grad_clip=None, accumulation_steps=1, init="default",
    )
    cfg = with_runtime(ScratchParams(**{**base.model_dump(), **pinned}), device="cpu")
    # "auto" resolves as the scratch stage resolves it on this machine: the row shows what runs.
    rt = resolve_runtime(device="cpu", precision=cfg.runtime.precision, channels_last=cfg.runtime.channels_last)
    return with_runtime(cfg, precision=rt.precision)


# --------------------------------------------------------------------------------------- main


def export_image_folder(split_dir: Path, split: str, dest: Path) -> Path:
    """``dest/<class>/<name>.<format>``: the split's stored images as files, the lessons' layout."""
    for row, data in zip(read_manifest(split_dir, split), iter_images(split_dir, split), strict=True):
        path = dest / f"{row['key']}.{row['format']}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return dest


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["tinyvgg", "simple_cnn"], help="zoo names (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per path and repeat (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="runs of every path; the median epoch is reported")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                    help="num_workers of the baseline rows (default: %(default)s); the first is the reference")
    ap.add_argument("--split-dir", type=Path, default=ROOT / "data" / "split")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml's base.seed")
    ap.add_argument("--all-layouts", action="store_true",
                    help="also time the engine in every other precision x layout cell (fp32/bf16 x NCHW/channels_last;"
                         " minutes more where bf16 is emulated)")
    ap.add_argument("--verbose", action="store_true", help="show the engine's progress bars and epoch lines")
    args = ap.parse_args(argv)
    if args.verbose:
        from cnnlab.utils.logs import configure

        configure()  # the engine's per-epoch lines, as the stages show them

    unknown = [m for m in args.models if m not in list_models()]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; known: {', '.join(list_models())}")
    if args.epochs < 1 or args.repeats < 1:
        ap.error("--epochs and --repeats must be >= 1")
    split_dir: Path = args.split_dir
    if not (split_dir / "train.csv").exists() or not (split_dir / "val.csv").exists():
        note(f"{split_dir}: no split found (train.csv, val.csv). Create it first with "
             "`dvc repro split` (or `make repro`), from the repository root.")
        return 2
    # The lessons' loop reads an ImageFolder: the split's images, written out as files once.
    folders = Path(tempfile.mkdtemp(prefix="cnnlab-imagefolder-"))
    atexit.register(shutil.rmtree, folders, ignore_errors=True)
    train_dir, val_dir = (export_image_folder(split_dir, s, folders / s) for s in ("train", "val"))
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        note(str(exc))
        return 2
    seed = params.base.seed if args.seed is None else args.seed
    size = resolve_image_size(params.scratch.image_size, split_dir, "scratch")

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy0, total0 = cpu_jiffies()
    own0 = own_cpu_seconds()
    torch.set_num_threads(torch.get_num_threads())  # PyTorch's default (one per usable core), stated
    threads = torch.get_num_threads()
    features = cpu_features()  # what PyTorch detects, and so what `precision: auto` decides on
    amx = "yes" if features.amx else "no"
    avx512_bf16 = "yes" if features.avx512_bf16 else "no"
    requested = load_params(args.params).scratch.runtime.precision

    # The decode cache (built by the stages already, or here): timed once, shared by every engine run.
    mode, classes = split_mode(split_dir), split_classes(split_dir)
    note("building the tensor cache ...")
    with contextlib.redirect_stderr(io.StringIO()):
        t0 = time.perf_counter()
        train = load_train(split_dir, None, mode=mode, size=size)
        t_train_cache = time.perf_counter() - t0
        t0 = time.perf_counter()
        val = load_split(split_dir, "val", mode=mode, size=size)
        t_val_cache = time.perf_counter() - t0
    mean, std = channel_stats(train.images[train.versions[:, 0]])
    tfm = baseline_transform(train_dir, mode, size, mean, std)
    in_channels = 1 if mode == "L" else 3

    # Same data: the ImageFolder's files are exactly the manifest's training images.
    folder_files = {Path(p).relative_to(train_dir).with_suffix("").as_posix()
                    for p, _ in datasets.ImageFolder(str(train_dir)).samples}
    manifest_files = {r["key"] for r in read_manifest(split_dir, "train")}
    same_data = "yes" if folder_files == manifest_files else (
        f"NO ({len(folder_files)} files in the folder, {len(manifest_files)} in train.csv)")

    note("measuring matmul peaks ...")
    # Emulated bf16 runs a 2048 product in many seconds: measure it smaller, and say so.
    bf16_n = 2048 if features.native_bf16 else 512
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16, n=bf16_n, warmup=1)}

    results: list[PathResult] = []
    flops: dict[str, tuple[float, float]] = {}
    same_init: dict[str, bool] = {}
    t_all = time.perf_counter()
    for arch in args.models:
        flops[arch] = flops_per_image(arch, in_channels, len(classes), size, args.batch_size)
        cfg = engine_params(args.params, arch, args.epochs, args.batch_size)
        cfg32 = with_runtime(cfg, precision="fp32", channels_last=False)
        spec = ModelSpec(kind="scratch", arch=arch, classes=classes, mode=mode, image_size=size, mean=mean, std=std,
                         kwargs={"dropout": 0.0})
        configs = [cfg32]
        if args.all_layouts:  # every precision x layout cell: tells the layout gain from the precision gain
            configs += [with_runtime(cfg, precision=p, channels_last=cl)
                        for p, cl in (("fp32", True), ("bf16", False), ("bf16", True))]
        configs = [c for c in configs if (c.runtime.precision, c.runtime.channels_last)
                   != (cfg.runtime.precision, cfg.runtime.channels_last)]
        configs.append(cfg)  # the params configuration: always the last row

        def label(c: ScratchParams) -> str:
            params_note = f"; params: {requested}" if c is cfg else ""
            layout = "channels_last" if c.runtime.channels_last else "NCHW"
            return f"engine ({c.runtime.precision}, {layout}{params_note})"

        baselines = [PathResult(arch, f"baseline ImageFolder, num_workers={w}", "fp32") for w in args.workers]
        engines = [PathResult(arch, label(c), c.runtime.precision) for c in configs]
        rows = baselines + engines
        for rep in range(args.repeats):
            for w, row in zip(args.workers, baselines):
                note(f"{arch} repeat {rep + 1}/{args.repeats}: {row.path} ...")
                torch.manual_seed(seed)
                net = create_model(arch, in_channels=in_channels, num_classes=len(classes), image_size=size)
                run_baseline(net, train_dir, val_dir, tfm, epochs=args.epochs, batch_size=args.batch_size,
                             workers=w, lr=cfg.lr, seed=seed, result=row)
            for c, row in zip(configs, engines):
                note(f"{arch} repeat {rep + 1}/{args.repeats}: {row.path} ...")
                torch.manual_seed(seed)  # as the scratch stage does before build_classifier
                model = build_classifier(spec)
                if rep == 0 and c is configs[0]:
                    torch.manual_seed(seed)
                    ref = create_model(arch, in_channels=in_channels, num_classes=len(classes), image_size=size)
                    same_init[arch] = all(torch.equal(a, b) for a, b in
                                          zip(ref.state_dict().values(), model.net.state_dict().values()))
                run_engine(model, train, val, c, seed=seed, verbose=args.verbose, result=row)
        results += rows
    t_all = time.perf_counter() - t_all
    busy1, total1 = cpu_jiffies()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = max(0.0, (busy1 - busy0) / hz - (own_cpu_seconds() - own0))
    machine_seconds = (total1 - total0) / hz

    # ------------------------------------------------------------------------------- report
    print("# Training throughput: cnnlab engine vs ImageFolder + DataLoader baseline\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; AMX: {amx}, avx512_bf16: {avx512_bf16}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"- torch {torch.__version__}, torchvision {torchvision.__version__}, python {platform.python_version()}; "
          f"threads: torch.set_num_threads(torch.get_num_threads()) = {threads}")
    share = others / machine_seconds if machine_seconds > 0 else 0.0
    busy = share > 0.05
    if machine_seconds > 0:
        print(f"- other processes: load average {load_start:.2f} at the start; they used {others:,.0f} CPU-s of the "
              f"{machine_seconds:,.0f} CPU-s the machine had during the run ({share:.0%})"
              + (" -- the machine was NOT quiet: every figure below is depressed and noisy; re-run when idle"
                 if busy else ""))
    print(f"- matmul peak (>= 1.5 s timed after warm-up): fp32 {peak['fp32'] / 1e9:,.3g} GFLOP/s (2048x2048), "
          f"bf16 {peak['bf16'] / 1e9:,.3g} GFLOP/s ({bf16_n}x{bf16_n})"
          + ("" if features.native_bf16 else " -- this CPU has no native bf16 (no AVX512-BF16 or AMX): PyTorch "
             "emulates it, so bf16 rows are slow and their '% of peak' is not shown"))
    print(f"- params.yaml scratch.runtime.precision: {requested!r}, resolved here to "
          f"{cfg_resolved_precision(args.params)!r}")
    print(f"- data: {len(train.versions):,} training images ({split_dir.name}'s shards, written out as an "
          f"ImageFolder for the baseline; {mode}, {size}x{size}); same images as train.csv: {same_data}; "
          f"decode cache (reused when built, untimed in the rows): "
          f"train {t_train_cache:.2f} s, val ({len(val):,} images) {t_val_cache:.2f} s")
    print(f"- run: {args.epochs} epochs x {args.repeats} repeat(s) per path, batch {args.batch_size}, Adam lr "
          f"{params.scratch.lr:g}, seed {seed}; images/s = images / median epoch time; training FLOPs = 3 x forward "
          f"(conv + matmul only); whole run {t_all:.0f} s")
    for arch in args.models:
        fwd, both = flops[arch]
        print(f"- {arch}: {fwd / 1e6:.2f} MFLOP forward per image (FlopCounterMode; measured fwd+bwd "
              f"{both / 1e6:.2f} = {both / fwd:.2f}x forward); identical initial weights in both loops: "
              f"{'yes' if same_init.get(arch) else 'NO'}")
    print()
    print("| model | path | precision | images/s | x baseline | achieved GFLOP/s | % of matmul peak |")
    print("|---|---|---|---:|---:|---:|---:|")
    by_model: dict[str, list[PathResult]] = {}
    for r in results:
        by_model.setdefault(r.model, []).append(r)
    for arch, rows in by_model.items():
        ref = rows[0].images_per_second
        for r in rows:
            gflops = 3 * flops[arch][0] * r.images_per_second / 1e9
            emulated = r.precision == "bf16" and not features.native_bf16
            pct = "n/a (emulated)" if emulated else f"{100 * gflops * 1e9 / peak[r.precision]:.1f}%"
            print(f"| {arch} | {r.path} | {r.precision} | {r.images_per_second:,.0f} | "
                  f"{r.images_per_second / ref:.2f}x | {gflops:.1f} | {pct} |")
    print()
    print("Epoch times (s, every epoch of every repeat) and accuracy after the last epoch (sanity: the paths "
          "train the same thing; train accuracy is the running accuracy during the last epoch):\n")
    print("| model | path | epoch seconds | best-epoch images/s | train acc | val acc |")
    print("|---|---|---|---:|---:|---:|")
    for r in results:
        secs = ", ".join(f"{s:.2f}" for s in r.epoch_seconds)
        print(f"| {r.model} | {r.path} | {secs} | {r.images / min(r.epoch_seconds):,.0f} | "
              f"{statistics.median(r.train_accuracy):.1%} | "
              f"{statistics.median(r.val_accuracy):.1%} |")
    print()
    print(f"Goal: the engine (params configuration) at least {GOAL:g}x the baseline."
          + (f" UNRELIABLE this run: other processes used {share:.0%} of the CPU, which slows the paths "
             "unevenly; re-run on an idle machine before quoting these." if busy else "") + "\n")
    for arch, rows in by_model.items():
        engine = rows[-1].images_per_second
        lesson = rows[0]
        best = max(rows[:len(args.workers)], key=lambda r: r.images_per_second)
        verdict = "MET" if engine / lesson.images_per_second >= GOAL else "NOT MET"
        fastest = (rows[-1].images / min(rows[-1].epoch_seconds)) / (lesson.images / min(lesson.epoch_seconds))
        line = (f"- {arch}: {engine / lesson.images_per_second:.2f}x vs {lesson.path} -> {verdict} "
                f"(best epoch vs best epoch: {fastest:.2f}x)")
        if best is not lesson:
            strict = "met" if engine / best.images_per_second >= GOAL else "not met"
            line += f"; {engine / best.images_per_second:.2f}x vs the fastest baseline ({best.path}): {strict}"
        print(line)
    print(f"\nThe params configuration against the fastest engine row (goal: within {PARAMS_GOAL:.0%}):\n")
    for arch, rows in by_model.items():
        engines = rows[len(args.workers):]
        best = max(engines, key=lambda r: r.images_per_second)
        ratio = rows[-1].images_per_second / best.images_per_second
        verdict = "MET" if ratio >= 1 - PARAMS_GOAL else "NOT MET"
        print(f"- {arch}: {rows[-1].path} {rows[-1].images_per_second:,.0f} images/s = {ratio:.0%} of the fastest, "
              f"{best.path} {best.images_per_second:,.0f} -> {verdict}")
    print("\nWhere the gain comes from (images/s ratios):\n")
    for arch, rows in by_model.items():
        base, e32, eng = rows[0], rows[len(args.workers)], rows[-1]
        print(f"- {arch}: data path (engine fp32 NCHW vs {base.path}) "
              f"{e32.images_per_second / base.images_per_second:.2f}x; then {eng.precision} + memory layout "
              f"({eng.path} vs engine fp32 NCHW) {eng.images_per_second / e32.images_per_second:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
