"""fine_tune on tiny real data, starting from a real feature_extract model (offline weights)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch

from cnnlab.config import FineTuneVariant
from cnnlab.models.classifier import load_classifier
from cnnlab.stages.fine_tune import active_blocks, fine_tune, param_groups
from cnnlab.stages.variant import VariantRun
from cnnlab.training.checkpoint import load_checkpoint
from cnnlab.training.outputs import TrainOutputs
from helpers.variant_runs import extract_features

# The loop's settings and the fine-tune settings are one section now.
FT = FineTuneVariant(from_="feature_extract", epochs=2, batch_size=16, early_stopping_patience=None, lr=0.001,
                     unfreeze_blocks=2, block_lr_decay=0.3, unfreeze_every=0, train_bn=True)


def _outs(root: Path) -> TrainOutputs:
    return TrainOutputs(model_dir=root / "model", metrics=root / "metrics.json", history=root / "history.csv",
                        curves=root / "curves.png", checkpoint=root / "ckpt.pt")


def _variant(root: Path, logged_params: dict) -> VariantRun:
    return VariantRun(name="fine_tune", kind="fine_tune", stage="fine_tune@fine_tune", seed=0, experiment="t",
                      logged_params=logged_params, out=_outs(root))


def _fine_tune(split_dir: Path, start: Path, root: Path, cfg: FineTuneVariant = FT,
               logged_params: dict | None = None):
    """The stage on the split's own training images (train_data: original: no augmented folder is read)."""
    return fine_tune(_variant(root, {"variant": "fine_tune"} if logged_params is None else logged_params), cfg,
                     split_dir=split_dir, augmented_dir=split_dir.parent / "no-augmented", start_model=start)


@pytest.fixture
def start(split_dir: Path, tmp_path: Path) -> Path:
    extract_features(split_dir, tmp_path / "fx")
    return tmp_path / "fx" / "model"


def test_only_the_top_blocks_and_head_change(split_dir: Path, start: Path, tmp_path: Path):
    before, spec = load_classifier(start)
    result = _fine_tune(split_dir, start, tmp_path / "ft")
    after, _ = load_classifier(tmp_path / "ft" / "model")
    assert result.summary["unfrozen"] == ["bn2", "conv_head"]  # nearest the head first
    b, a = before.state_dict(), after.state_dict()
    top = result.summary["unfrozen"]
    changed = {k for k in b if not torch.equal(b[k], a[k])}
    assert any(k.startswith("net.head.") for k in changed)
    assert any(k.startswith(f"net.features.{top[-1]}.") for k in changed)
    frozen = [k for k in b if k.startswith("net.features.") and not any(k.startswith(f"net.features.{t}") for t in top)]
    assert frozen and not (changed & set(frozen))  # lower blocks, BN statistics included, untouched
    assert mlflow.MlflowClient().get_run(result.run_id).info.status == "FINISHED"


def test_learning_rates_fall_from_head_to_lower_blocks(start: Path):
    clf, _ = load_classifier(start)
    groups = param_groups(clf, ["conv_head", "blocks.6", "blocks.5"], lr=1e-3, decay=0.3)
    assert [g["name"] for g in groups] == ["head", "conv_head", "blocks.6", "blocks.5"]
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-3 and abs(lrs[2] - 9e-5) < 1e-12


def test_gradual_unfreezing_schedule():
    top = ["a", "b", "c"]
    assert active_blocks(top, 1, 0) == top
    assert [active_blocks(top, e, 2) for e in (1, 2, 3, 5, 9)] == [["a"], ["a"], ["a", "b"], top, top]


def test_refuses_to_start_from_a_non_backbone_model(split_dir: Path, tmp_path: Path):
    from cnnlab.models.classifier import ModelSpec, build_classifier, save_classifier

    spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=["a", "b"], mode="L", image_size=28, mean=[0.5], std=[0.5])
    save_classifier(build_classifier(spec), spec, tmp_path / "zoo")
    with pytest.raises(ValueError, match="starts from a pretrained model"):
        _fine_tune(split_dir, tmp_path / "zoo", tmp_path / "x", logged_params={})


RESUME = """
import sys, json, time
sys.path.insert(0, {tests!r})
from pathlib import Path
import cnnlab.training.engine as engine
from cnnlab.config import FineTuneVariant
from cnnlab.utils.logs import configure
from cnnlab.stages.fine_tune import fine_tune
from cnnlab.stages.variant import VariantRun
from cnnlab.training.outputs import TrainOutputs
configure()  # as the stage scripts do: the package's log lines on stderr
slow = float(sys.argv[2])
real = engine.validate
def evaluate(*a, **k):
    time.sleep(slow); return real(*a, **k)
engine.validate = evaluate
root = Path(sys.argv[1])
out = TrainOutputs(model_dir=root / "model", metrics=root / "metrics.json", history=root / "history.csv",
                   curves=root / "curves.png", checkpoint=root / "ckpt.pt")
cfg = FineTuneVariant(from_="feature_extract", epochs=4, batch_size=16, early_stopping_patience=None, lr=0.001,
                      unfreeze_blocks=2, block_lr_decay=0.3, unfreeze_every=1, train_bn=True)
v = VariantRun(name="fine_tune", kind="fine_tune", stage="fine_tune@fine_tune", seed=0, experiment="t",
               logged_params={{"variant": "fine_tune"}}, out=out)
r = fine_tune(v, cfg, split_dir=Path({split!r}), augmented_dir=Path({split!r}).parent / "no-augmented",
              start_model=Path({start!r}))
print(json.dumps({{"run_id": r.run_id}}))
"""


def test_killed_fine_tune_resumes_to_the_same_metrics_in_the_same_run(split_dir: Path, start: Path, tmp_path: Path):
    script = tmp_path / "ft.py"
    script.write_text(RESUME.format(tests=str(Path(__file__).parent), split=str(split_dir), start=str(start)))
    env = {**__import__("os").environ}
    full = subprocess.run([sys.executable, str(script), str(tmp_path / "full"), "0"], capture_output=True, text=True,
                          env=env)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), str(killed), "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and (load_checkpoint(killed / "ckpt.pt", _fp(killed)) or {}).get("epoch", 0) < 1:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert (killed / "ckpt.pt").exists() and not (killed / "metrics.json").exists()
    resumed = subprocess.run([sys.executable, str(script), str(killed), "0"], capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    assert (tmp_path / "full/metrics.json").read_text() == (killed / "metrics.json").read_text()
    run_id = json.loads(resumed.stdout.strip().splitlines()[-1])["run_id"]
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")) == 4  # one run, every epoch


def _fp(root: Path) -> str | None:
    """The fingerprint stored in a checkpoint (the test cannot recompute it cheaply)."""
    try:
        return torch.load(root / "ckpt.pt", map_location="cpu", weights_only=True)["fingerprint"]
    except Exception:
        return None


def test_cached_frozen_blocks_train_the_same_model_as_running_them(split_dir: Path, start: Path, tmp_path: Path):
    """Computing the frozen blocks once per image is an optimisation only: same weights, same
    history, whether they run every epoch or not (up to float rounding of the layout)."""
    ft = FT.model_copy(update={"unfreeze_blocks": 4, "block_lr_decay": 0.5, "unfreeze_every": 0, "train_bn": False})
    runs = {}
    for cache in (True, False):
        runs[cache] = _fine_tune(split_dir, start, tmp_path / str(cache), ft.model_copy(update={"cache_frozen": cache}),
                                 logged_params={"cache": cache})
    cached, _ = load_classifier(tmp_path / "True" / "model")
    plain, _ = load_classifier(tmp_path / "False" / "model")
    a, b = cached.state_dict(), plain.state_dict()
    assert a.keys() == b.keys()  # the saved model is whole: the frozen blocks are back in place
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4), k
    hist = [pd.read_csv(tmp_path / str(c) / "history.csv") for c in (True, False)]
    assert (hist[0]["val_accuracy"] == hist[1]["val_accuracy"]).all()
    assert (hist[0]["train_loss"] - hist[1]["train_loss"]).abs().max() < 1e-3


def test_frozen_blocks_with_dropout_or_too_big_for_memory_are_not_cached(start: Path):
    from cnnlab.training.prefix_cache import prefix_cacheable
    from cnnlab.training.hardware import resolve_runtime

    clf, _ = load_classifier(start)
    sample = torch.randint(0, 255, (2, 1, 32, 32), dtype=torch.uint8)
    # bf16 too, whatever this CPU has (what `auto` picks where it is native): its cached outputs
    # are bf16 and must go through the rest of the net as training runs it, under autocast.
    for precision in ("bf16", "fp32"):
        rt = resolve_runtime(device="cpu", precision=precision)
        assert prefix_cacheable(clf, ["conv_stem", "bn1", "blocks.0", "blocks.1"], sample, rt=rt) is None, precision
    rt = resolve_runtime(device="cpu", precision="fp32")
    assert prefix_cacheable(clf, ["conv_stem", "bn1"], sample, rt=rt) is None
    assert "GiB of memory" in prefix_cacheable(clf, ["conv_stem", "bn1"], sample, rt=rt, images=10**7)
    clf.net.features.bn1.add_module("drop", torch.nn.Dropout(0.1))  # a random op in a frozen block
    assert "dropout" in prefix_cacheable(clf, ["conv_stem", "bn1"], sample, rt=rt)
