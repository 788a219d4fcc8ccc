"""Data-parallel training under torchrun (gloo on this CPU): two ranks with batch b train like one
process with batch 2b, every rank ends with the same weights, and resuming works. The stages with
distributed.nproc_per_node = 2 (one MLflow run each, the usual outputs) are in test_team.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

BIN = Path(sys.executable).parent
WORKER = REPO / "tests" / "helpers" / "ddp_worker.py"


def _train(tmp_path: Path, name: str, nproc: int, *args: str) -> list[dict]:
    """Run the worker (under torchrun when nproc > 1); each rank's saved state, in rank order."""
    out = tmp_path / f"{name}.pt"
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    done = subprocess.run([*cmd, str(WORKER), "--out", str(out), *args], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": f"{REPO / 'src'}:{REPO / 'tests'}", "PATH": str(BIN)})
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out.with_name(f"{name}.rank{r}.pt"), weights_only=False) for r in range(nproc)]


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].is_floating_point())


def _relative_weight_diff(a: dict, b: dict) -> float:
    """|a - b| / |b| over the learned weights (not BatchNorm's running statistics)."""
    keys = [k for k in b if b[k].is_floating_point() and "running_" not in k and k not in ("mean", "std")]
    va, vb = (torch.cat([s[k].flatten().double() for k in keys]) for s in (a, b))
    return ((va - vb).norm() / vb.norm()).item()


def test_two_ranks_of_16_train_like_one_process_of_32():
    """tinyvgg has no batch statistics, so the one-epoch weights agree to float rounding (the
    gradient is averaged in another order); measured here: max |difference| 1.5e-8."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        one = _train(Path(d), "one", 1, "--batch", "32")[0]
        ranks = _train(Path(d), "two", 2, "--batch", "16")
    for rank in ranks:
        assert _max_diff(rank["state"], one["state"]) < 1e-5
    assert all(torch.equal(ranks[0]["state"][k], ranks[1]["state"][k]) for k in ranks[0]["state"])
    # The reported epoch is over all ranks' images: the same loss and accuracy as one process.
    assert ranks[0]["history"][0]["train_accuracy"] == one["history"][0]["train_accuracy"]
    assert ranks[0]["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-5)
    assert ranks[0]["history"][0]["val_accuracy"] == one["history"][0]["val_accuracy"]


def test_batchnorm_statistics_are_averaged_so_every_rank_ends_the_same(tmp_path: Path):
    """simple_cnn normalizes with each rank's own 16 images (no SyncBatchNorm on CPU), so it trains
    close to, not exactly like, one process of 32 (measured here after 2 epochs: weights 1.2% apart
    by norm, max |difference| 0.0097); the running statistics are averaged at each epoch's end,
    so the ranks agree bit for bit."""
    ranks = _train(tmp_path, "bn", 2, "--arch", "simple_cnn", "--batch", "16", "--epochs", "2")
    one = _train(tmp_path, "bn1", 1, "--arch", "simple_cnn", "--batch", "32", "--epochs", "2")[0]
    state0, state1 = ranks[0]["state"], ranks[1]["state"]
    means = [k for k in state0 if k.endswith("running_mean")]
    assert means and all(torch.equal(state0[k], state1[k]) for k in state0)
    assert 0 < _relative_weight_diff(state0, one["state"]) < 0.05


def test_a_resumed_two_rank_run_ends_where_an_uninterrupted_one_does(tmp_path: Path):
    straight = _train(tmp_path, "straight", 2, "--batch", "16", "--epochs", "2")
    ckpt = tmp_path / "ckpt.pt"
    _train(tmp_path, "first", 2, "--batch", "16", "--epochs", "1", "--checkpoint", str(ckpt))
    resumed = _train(tmp_path, "resumed", 2, "--batch", "16", "--epochs", "2", "--checkpoint", str(ckpt))
    assert resumed[0]["resumed_from"] == 1
    for rank in (0, 1):
        assert all(torch.equal(resumed[rank]["state"][k], straight[rank]["state"][k]) for k in straight[rank]["state"])
