#!/usr/bin/env python
"""Transfer-learning speed: cached-feature head training vs the naive loop, and fine-tune throughput.

Run from the repository root (the split must exist: `dvc repro split` or `make repro`)::

    .venv/bin/python bench/transfer_speed.py                                    # defaults, a few minutes
    .venv/bin/python bench/transfer_speed.py --images 256 --val-images 128 --epochs 2 --steps 5   # smoke run

Part 1, feature_extract vs naive. The same frozen ImageNet backbone (params.yaml
``feature_extract.backbone``, pretrained weights), the same head (same initial weights, same
dropout masks: the global RNG is re-seeded before each arm), the same images, the same number
of epochs, the same engine settings for the head (``feature_extract.head`` with early stopping
off, so both arms run every epoch) are trained two ways, in one process:

* feature_extract (how the `feature_extract` stage works): the backbone runs ONCE per training
  and validation image (``cnnlab.training.features.Trunk`` + ``cnnlab.training.engine.predict_logits``, the calls
  ``cached_features`` makes: bf16 autocast, channels_last, inference mode), then
  ``cnnlab.training.engine.fit`` trains the head on the cached feature vectors (fp32, as
  ``FeatureExtractParams.head_fit_params`` sets it) and validates it on the cached val
  features every epoch.
* naive: ``fit`` trains the whole classifier (``build_pretrained_classifier``: normalization,
  backbone, head) on the uint8 images, with every backbone parameter frozen
  (``requires_grad=False``) and the backbone put back in eval mode at the start of every epoch
  (BatchNorm keeps its ImageNet statistics). The backbone forward is recomputed for every batch of
  every epoch, and again for the per-epoch validation. Backbone forwards use the same bf16
  autocast + channels_last; the head runs in fp32 (outside autocast), as in the other arm.

Timed (time.perf_counter, wall): feature_extract = extraction of train + val features + the
whole ``fit`` call on them; naive = the whole ``fit`` call. Both include per-epoch validation.
Not timed in either: decoding the PNGs into the uint8 tensor cache (shared, reported once),
loading the pretrained weights, the stage's extraction of the test split and its writing of the
feature files (evaluation / bookkeeping, not training), MLflow. One untimed backbone forward on a
few batches comes first, so neither arm pays oneDNN's first-use kernel selection.

Part 2, fine-tune throughput. images/s of the `fine_tune` stage's training step: the
feature_extract-style classifier (backbone + head), the top ``fine_tune.unfreeze_blocks`` blocks
unfrozen at once (``Hooks.param_groups`` with ``block_lr_decay``, ``make_before_epoch``: frozen
BatchNorm in eval mode), fused AdamW (``make_optimizer``), one ``fit`` epoch of ``--steps``
batches, its ``epoch_seconds`` timed, after an untimed ``fit`` epoch of ``--warmup`` batches.
Four settings, each from the same pretrained weights: fp32 NCHW, bf16 autocast NCHW, fp32
channels_last, bf16 + channels_last (the stage's). With ``--repeats`` > 1 the settings are
interleaved round by round and the median is reported.

Threads: ``torch.set_num_threads(--threads)``, default PyTorch's own (one per usable core).
The report says how much CPU other processes used during the run; above 5%, the figures are
marked unreliable. This is a benchmark to run by hand: it prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnlab.config import ConfigError, FeatureExtractParams, FitParams, load_params
from cnnlab.data.tensors import TensorSet, TrainSet, load_split, load_train, split_mode
from cnnlab.training.engine import Hooks, fit, predict_logits
from cnnlab.stages.fine_tune import make_before_epoch, param_groups
from cnnlab.training.hardware import cpu_features, resolve_runtime
from cnnlab.models.backbones import WeightsUnavailableError, create_backbone
from cnnlab.models.classifier import build_pretrained_classifier
from cnnlab.models.classifier import Classifier
from cnnlab.training.features import Trunk
from cnnlab.stages.feature_extract import backbone_spec

# The machine helpers of the sibling benchmark (bench/ is on sys.path when a script there runs).
sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import cpu_jiffies, cpu_model, own_cpu_seconds  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOAL = 10.0  # the goal: feature_extract at least 10x faster than the naive loop at 10 epochs
LAYOUTS = [("fp32", False), ("bf16", False), ("fp32", True), ("bf16", True)]  # (precision, channels_last)


def note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(verbose: bool):
    """fit's progress bars go to stderr; hidden unless --verbose (which also shows its logged epoch lines)."""
    return contextlib.nullcontext() if verbose else contextlib.redirect_stderr(io.StringIO())


def with_runtime(cfg, **runtime: object):
    """``cfg`` (a params section with a ``runtime``) with some runtime keys changed, validated again."""
    return type(cfg)(**{**cfg.model_dump(by_alias=True), "runtime": {**cfg.runtime.model_dump(), **runtime}})


# ------------------------------------------------------------------- part 1: head training


class Fp32Head(nn.Module):
    """The head run outside autocast on float32 features, so the naive arm's head computes in
    fp32 like the feature_extract arm's (whose head trains on fp32 feature vectors)."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.inner = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return self.inner(x.float())


@dataclass
class ArmResult:
    name: str
    wall: list[float] = field(default_factory=list)  # whole arm, per repeat
    extract: list[float] = field(default_factory=list)  # feature_extract only
    train_epochs: list[float] = field(default_factory=list)  # sum of fit's epoch_seconds
    val_accuracy: list[float] = field(default_factory=list)  # after the last epoch
    best_val_accuracy: list[float] = field(default_factory=list)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)


def run_feature_extract(clf: Classifier, head_init: dict, train: TrainSet, val: TensorSet, head_cfg: FitParams, *,
                        extract_batch: int, precision: str, channels_last: bool, seed: int, verbose: bool,
                        result: ArmResult) -> None:
    """The stage's way: backbone once per image (as cached_features does it), head on the vectors."""
    clf.net.head.load_state_dict(head_init)
    t0 = time.perf_counter()
    trunk = Trunk(clf).eval()
    if channels_last:
        trunk.to(memory_format=torch.channels_last)
    feats = {}
    for name, images in (("train", train.images), ("val", val.images)):
        feats[name] = predict_logits(trunk, images, batch_size=extract_batch, device=torch.device("cpu"),
                                     precision=precision, channels_last=channels_last)
    t_extract = time.perf_counter() - t0
    ftrain = TrainSet(feats["train"], train.labels, torch.arange(len(train.labels))[:, None])
    fval = TensorSet(feats["val"], val.labels)
    torch.manual_seed(seed)  # same dropout masks as the naive arm
    with quiet(verbose):
        fr = fit(clf.net.head, ftrain, fval, head_cfg, seed=seed)
    result.wall.append(time.perf_counter() - t0)
    result.extract.append(t_extract)
    result.train_epochs.append(sum(r["epoch_seconds"] for r in fr.history))
    result.val_accuracy.append(fr.history[-1]["val_accuracy"])
    result.best_val_accuracy.append(fr.best_val_accuracy)


def run_naive(clf: Classifier, head_init: dict, train: TrainSet, val: TensorSet, cfg: FitParams, *, seed: int,
              verbose: bool, result: ArmResult) -> None:
    """The naive way: fit on the images, frozen backbone in eval mode recomputed every batch."""
    head = clf.net.head.inner
    head.load_state_dict(head_init)
    for p in clf.net.features.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # same dropout masks as the feature_extract arm
    t0 = time.perf_counter()
    with quiet(verbose):
        fr = fit(clf, train, val, cfg, seed=seed,
                 hooks=Hooks(param_groups=[{"params": list(head.parameters())}],
                             before_epoch=lambda epoch, model: model.net.features.eval()))
    result.wall.append(time.perf_counter() - t0)
    result.train_epochs.append(sum(r["epoch_seconds"] for r in fr.history))
    result.val_accuracy.append(fr.history[-1]["val_accuracy"])
    result.best_val_accuracy.append(fr.best_val_accuracy)


# --------------------------------------------------------------- part 2: fine-tune throughput


def finetune_images_per_second(pristine: Classifier, top: list[str], data: TensorSet, val: TensorSet,
                               cfg: FitParams, *, decay: float, train_bn: bool, steps: int, warmup: int,
                               seed: int, verbose: bool) -> float:
    """One untimed fit epoch of ``warmup`` batches, then one of ``steps`` batches; images/s of the
    latter from fit's own epoch_seconds (validation excluded). A fresh copy of the weights each time."""
    clf = copy.deepcopy(pristine)  # fit converts the model to channels_last in place
    before = make_before_epoch(top, 0, train_bn)  # all top blocks at once: the steady state
    n = len(data.labels)
    rates = []
    for batches in (warmup, steps):
        rows = torch.arange(batches * cfg.batch_size) % n
        subset = TrainSet(data.images, data.labels, rows[:, None])
        groups = param_groups(clf, top, lr=cfg.lr, decay=decay)
        torch.manual_seed(seed)
        with quiet(verbose):
            fr = fit(clf, subset, val, cfg, seed=seed, hooks=Hooks(param_groups=groups, before_epoch=before))
        rates.append(len(rows) / fr.history[0]["epoch_seconds"])
    return rates[-1]


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=10, help="head-training epochs in both arms (default: %(default)s)")
    ap.add_argument("--images", type=int, default=None,
                    help="training images (a seeded random subset of train.csv; default: all)")
    ap.add_argument("--val-images", type=int, default=None,
                    help="validation images (a seeded random subset of val.csv; default: all)")
    ap.add_argument("--image-size", type=int, default=None, help="default: params.yaml feature_extract.image_size")
    ap.add_argument("--steps", type=int, default=20, help="timed fine-tune steps per setting (default: %(default)s)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed fine-tune steps first (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="fine-tune step batch (default: params.yaml fine_tune.batch_size); part 1 uses "
                         "feature_extract.batch_size (extraction) and feature_extract.head.batch_size")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each arm / setting, interleaved; medians are reported (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's own)")
    ap.add_argument("--skip", choices=["head", "finetune"], default=None, help="leave out part 1 or part 2")
    ap.add_argument("--split-dir", type=Path, default=ROOT / "data" / "split")
    ap.add_argument("--params", type=Path, default=ROOT / "params.yaml")
    ap.add_argument("--seed", type=int, default=None, help="default: params.yaml's base.seed")
    ap.add_argument("--verbose", action="store_true", help="show fit's progress bars and epoch lines")
    args = ap.parse_args(argv)
    if args.verbose:
        from cnnlab.utils.logs import configure

        configure()  # fit's per-epoch lines, as the stages show them
    for opt in ("epochs", "steps", "repeats"):
        if getattr(args, opt) < 1:
            ap.error(f"--{opt} must be >= 1")
    for opt in ("images", "val_images", "batch_size", "threads", "image_size"):
        if getattr(args, opt) is not None and getattr(args, opt) < 1:
            ap.error(f"--{opt.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")

    split_dir: Path = args.split_dir
    if not all((split_dir / f).exists() for f in ("train.csv", "val.csv", "classes.json")):
        note(f"{split_dir}: no split found (train.csv, val.csv, classes.json). Create it first with "
             "`dvc repro split` (or `make repro`), from the repository root.")
        return 2
    try:
        params = load_params(args.params)
    except ConfigError as exc:
        note(str(exc))
        return 2
    # "auto" resolved as the stages resolve it on this machine, so the rows say what runs
    fxp, ftp = (with_runtime(p, precision=resolve_runtime(device="cpu", precision=p.runtime.precision).precision)
                for p in (params.feature_extract, params.fine_tune))
    seed = params.base.seed if args.seed is None else args.seed
    size = args.image_size or fxp.image_size
    ft_batch = args.batch_size or ftp.batch_size

    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        torch.set_num_threads(torch.get_num_threads())  # PyTorch's default (one per usable core), stated
    threads = torch.get_num_threads()
    features = cpu_features()
    amx = "yes" if features.amx else "no"
    avx512_bf16 = "yes" if features.avx512_bf16 else "no"
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    busy0, total0 = cpu_jiffies()
    own0 = own_cpu_seconds()
    t_all = time.perf_counter()

    # --- data: decoded once into uint8 tensors at the stage's size, shared by every run (untimed)
    note(f"loading the split at {size}x{size} ...")
    mode = split_mode(split_dir)
    t0 = time.perf_counter()
    with quiet(args.verbose):
        full_train = load_train(split_dir, None, mode=mode, size=size)
        full_val = load_split(split_dir, "val", mode=mode, size=size)
    t_load = time.perf_counter() - t0
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(full_train.labels), generator=g)[: args.images or len(full_train.labels)]
    train = TrainSet(full_train.images[pick], full_train.labels[pick], torch.arange(len(pick))[:, None])
    vpick = torch.randperm(len(full_val.labels), generator=g)[: args.val_images or len(full_val.labels)]
    val = TensorSet(full_val.images[vpick], full_val.labels[vpick])

    # --- the classifier the stages build (pretrained backbone + head), built once
    note(f"building {fxp.backbone} (weights: {fxp.weights}) ...")
    spec = backbone_spec(split_dir, FeatureExtractParams(**{**fxp.model_dump(), "image_size": size}))
    torch.manual_seed(seed)
    try:
        pristine = build_pretrained_classifier(spec)
    except WeightsUnavailableError as exc:
        note(str(exc))
        return 2
    pristine.eval()
    head_init = copy.deepcopy(pristine.net.head.state_dict())
    _, info = create_backbone(fxp.backbone, weights=None)  # block names only
    n_params = sum(p.numel() for p in pristine.parameters())

    # --- part 1
    fe = ArmResult("feature_extract (backbone once, cached features)")
    nv = ArmResult("naive (backbone recomputed every batch, every epoch)")
    head_cfg = with_runtime(FitParams(**{**fxp.head_fit_params().model_dump(), "epochs": args.epochs,
                                         "early_stopping_patience": None}), device="cpu")
    naive_cfg = with_runtime(head_cfg, precision=fxp.runtime.precision, channels_last=fxp.runtime.channels_last)
    if args.skip != "head":
        note("warm-up: one untimed backbone forward ...")
        warm = Trunk(copy.deepcopy(pristine)).eval()
        if fxp.runtime.channels_last:
            warm.to(memory_format=torch.channels_last)
        predict_logits(warm, train.images[: 2 * fxp.batch_size], batch_size=fxp.batch_size,
                       device=torch.device("cpu"), precision=fxp.runtime.precision,
                       channels_last=fxp.runtime.channels_last)
        del warm
        for r in range(args.repeats):
            order = ["fe", "naive"] if r % 2 == 0 else ["naive", "fe"]
            for arm in order:
                clf = copy.deepcopy(pristine)
                if arm == "fe":
                    note(f"part 1, repeat {r + 1}/{args.repeats}: feature_extract, {args.epochs} epochs ...")
                    run_feature_extract(clf, head_init, train, val, head_cfg, extract_batch=fxp.batch_size,
                                        precision=fxp.runtime.precision,
                                        channels_last=fxp.runtime.channels_last, seed=seed,
                                        verbose=args.verbose, result=fe)
                else:
                    note(f"part 1, repeat {r + 1}/{args.repeats}: naive, {args.epochs} epochs ...")
                    clf.net.head = Fp32Head(clf.net.head)
                    run_naive(clf, head_init, train, val, naive_cfg, seed=seed, verbose=args.verbose, result=nv)
                del clf

    # --- part 2
    top = list(reversed(info.blocks))[: ftp.unfreeze_blocks]  # nearest the head first, as fine_tune does
    rates: dict[tuple[str, bool], list[float]] = {k: [] for k in LAYOUTS}
    ft_base = FitParams(**ftp.model_dump(include=set(FitParams.model_fields)))  # the loop's settings alone
    ft_data = TensorSet(train.images, train.labels)
    ft_val = TensorSet(val.images[:ft_batch], val.labels[:ft_batch])  # fit validates; keep it cheap (untimed)
    if args.skip != "finetune":
        for r in range(args.repeats):
            for precision, cl in (LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]):
                note(f"part 2, repeat {r + 1}/{args.repeats}: fine-tune step, {precision}, "
                     f"{'channels_last' if cl else 'NCHW'} ...")
                cfg = with_runtime(FitParams(**{**ft_base.model_dump(), "epochs": 1, "batch_size": ft_batch,
                                                "early_stopping_patience": None}),
                                   precision=precision, channels_last=cl, device="cpu")
                rates[(precision, cl)].append(finetune_images_per_second(
                    pristine, top, ft_data, ft_val, cfg, decay=ftp.block_lr_decay, train_bn=ftp.train_bn,
                    steps=args.steps, warmup=args.warmup, seed=seed, verbose=args.verbose))

    t_all = time.perf_counter() - t_all
    busy1, total1 = cpu_jiffies()
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = max(0.0, (busy1 - busy0) / hz - (own_cpu_seconds() - own0))
    machine_seconds = (total1 - total0) / hz
    share = others / machine_seconds if machine_seconds > 0 else 0.0
    busy = share > 0.05

    # ------------------------------------------------------------------------------- report
    print("# Transfer-learning speed: cached features vs naive head training; fine-tune step throughput\n")
    print(f"- machine: {cpu_model()}, {os.cpu_count()} logical CPUs; AMX: {amx}, avx512_bf16: {avx512_bf16}; "
          f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"- torch {torch.__version__}, python {platform.python_version()}; threads: {threads}")
    if machine_seconds > 0:
        print(f"- other processes: load average {load_start:.2f} at the start; they used {others:,.0f} CPU-s of the "
              f"{machine_seconds:,.0f} CPU-s the machine had during the run ({share:.0%})"
              + (" -- the machine was NOT quiet: the figures below are depressed and noisy; re-run when idle"
                 if busy else ""))
    print(f"- backbone: {fxp.backbone} (weights {fxp.weights}), {n_params / 1e6:.2f} M parameters with the head; "
          f"head: dropout {fxp.head_dropout:g}, hidden {fxp.head_hidden}; input {size}x{size} {mode}")
    print(f"- data: {len(train.labels):,} training + {len(val.labels):,} validation images of {split_dir.name} "
          f"(decoded once into uint8 tensors, untimed: {t_load:.1f} s); seed {seed}; whole run {t_all:.0f} s")

    if args.skip != "head":
        print(f"\n## 1. feature_extract vs naive: {args.epochs} epochs of head training\n")
        print(f"Both arms: head {head_cfg.optimizer} lr {head_cfg.lr:g}, wd {head_cfg.weight_decay:g}, "
              f"{head_cfg.scheduler} schedule, batch {head_cfg.batch_size}, fp32 head, no early stopping, "
              f"validation every epoch; backbone forwards {fxp.runtime.precision} autocast"
              f"{' + channels_last' if fxp.runtime.channels_last else ''}, eval mode. Extraction batch {fxp.batch_size}. "
              f"{args.repeats} repeat(s), interleaved; medians.\n")
        print("| arm | wall s | backbone forward, once (s) | head train epochs (s) | validation + rest (s) "
              "| val acc (last epoch) | best val acc |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for a in (fe, nv):
            wall = a.median_wall
            ext = statistics.median(a.extract) if a.extract else 0.0
            tr = statistics.median(a.train_epochs)
            rest = wall - ext - tr
            print(f"| {a.name} | {wall:.2f} | {f'{ext:.2f}' if a.extract else '-'} | {tr:.2f} | {rest:.2f} | "
                  f"{statistics.median(a.val_accuracy):.1%} | {statistics.median(a.best_val_accuracy):.1%} |")
        ratio = nv.median_wall / fe.median_wall
        verdict = "MET" if ratio >= GOAL else "NOT MET"
        print(f"\nnaive / feature_extract wall time: **{ratio:.1f}x** (goal >= {GOAL:g}x at 10 epochs: {verdict}"
              + (f"; this run has {args.epochs} epochs" if args.epochs != 10 else "")
              + (f"; UNRELIABLE: other processes used {share:.0%} of the CPU" if busy else "") + ")")
        if len(fe.wall) > 1:
            print(f"every repeat, wall s: feature_extract {', '.join(f'{w:.2f}' for w in fe.wall)}; "
                  f"naive {', '.join(f'{w:.2f}' for w in nv.wall)}")
        per_image = fe.extract and statistics.median(fe.extract) / (len(train.labels) + len(val.labels))
        if per_image:
            print(f"backbone forward (inference mode, extraction): {1 / per_image:,.0f} images/s; the naive arm "
                  f"runs it {args.epochs}x over train + val, the feature_extract arm once")

    if args.skip != "finetune":
        print(f"\n## 2. fine-tune training step: {fxp.backbone} + head, top {len(top)} blocks unfrozen\n")
        print(f"Unfrozen at once: {', '.join(top)} (block_lr_decay {ftp.block_lr_decay:g}, train_bn {ftp.train_bn}); "
              f"{ft_base.optimizer} (fused), batch {ft_batch}, {args.warmup} warm-up steps then {args.steps} timed "
              f"steps per setting (fit's epoch_seconds), {args.repeats} repeat(s), interleaved; median images/s.\n")
        print("| precision | memory layout | images/s | vs fp32 NCHW | every repeat |")
        print("|---|---|---:|---:|---|")
        ref = statistics.median(rates[("fp32", False)])
        for precision, cl in LAYOUTS:
            rs = rates[(precision, cl)]
            med = statistics.median(rs)
            print(f"| {precision} | {'channels_last' if cl else 'NCHW'} | {med:,.1f} | {med / ref:.2f}x | "
                  f"{', '.join(f'{x:,.1f}' for x in rs)} |")
        stage = (ftp.runtime.precision, ftp.runtime.channels_last)
        if stage in rates:
            print(f"\nparams.yaml's fine_tune setting is {ftp.runtime.precision}"
                  f"{' + channels_last' if ftp.runtime.channels_last else ' NCHW'}: "
                  f"{statistics.median(rates[stage]) / ref:.2f}x fp32 NCHW.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
