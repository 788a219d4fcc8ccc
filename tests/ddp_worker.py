"""One training process for tests/test_distributed.py: `fit` on test_engine's tiny learnable data,
alone or as one rank under torchrun; every rank saves its final weights and buffers."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cnnlab.training import distributed
from cnnlab.config import TrainParams
from cnnlab.training.engine import fit
from test_engine import data, model


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
    cfg = TrainParams(epochs=args.epochs, batch_size=args.batch, early_stopping_patience=None, precision="fp32",
                      channels_last=False, scheduler="none", device="cpu")
    result = fit(m, train, val, cfg, seed=0, world=world, checkpoint=args.checkpoint, fingerprint="test")
    torch.save({"state": m.state_dict(), "history": result.history, "resumed_from": result.resumed_from_epoch},
               args.out.with_name(f"{args.out.stem}.rank{world.rank}.pt"))
    distributed.close(world)


if __name__ == "__main__":
    main()
