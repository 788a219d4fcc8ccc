"""One training process for tests/test_distributed.py: `fit` on tests/helpers/engine_data.py's tiny learnable data,
alone or as one rank under torchrun; every rank saves its final weights and buffers."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cnnlab.config import FitParams, RuntimeParams
from cnnlab.training import distributed
from cnnlab.training.checkpoint import Checkpointing
from cnnlab.training.engine import fit
from helpers.engine_data import data, model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tinyvgg")
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    world, device = distributed.init(torch.device("cpu"))
    train, val = data(n_per_class=32)
    m = model(seed=0, arch=args.arch)
    cfg = FitParams(epochs=args.epochs, batch_size=args.batch, early_stopping_patience=None, scheduler="none",
                    runtime=RuntimeParams(precision="fp32", channels_last=False, device="cpu"))
    checkpoint = Checkpointing(args.checkpoint, "test") if args.checkpoint is not None else None
    result = fit(m, train, val, cfg, seed=0, world=world, checkpoint=checkpoint)
    torch.save({"state": m.state_dict(), "history": result.history, "resumed_from": result.resumed_from_epoch},
               args.out.with_name(f"{args.out.stem}.rank{world.rank}.pt"))
    distributed.close(world)


if __name__ == "__main__":
    main()
