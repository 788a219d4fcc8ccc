"""The training engine on tiny, learnable tensor data (real training, small sizes)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnlab.config import TrainParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.engine import FocalLoss, balanced_class_weights, evaluate, fit, load_checkpoint
from cnnlab.models.classifier import ModelSpec, build_classifier

FAST = dict(epochs=4, batch_size=16, early_stopping_patience=None, precision="fp32", channels_last=False)


def data(n_per_class: int = 24, classes: int = 3, size: int = 12, seed: int = 0, copies: int = 0) -> tuple[TrainSet, TensorSet]:
    """Class c = a bright square at a class-specific place plus noise: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        labels = torch.arange(classes).repeat_interleave(n)
        imgs = torch.randint(0, 60, (len(labels), 1, size, size), generator=g, dtype=torch.uint8)
        for i, c in enumerate(labels.tolist()):
            imgs[i, 0, 2 + 3 * c: 5 + 3 * c, 2:6] = 250
        return imgs, labels

    x, y = make(n_per_class)
    n = len(y)
    versions = [[i] for i in range(n)]
    if copies:
        extra = [x.roll(1, dims=3) for _ in range(copies)]
        for k in range(copies):
            for i in range(n):
                versions[i].append(n * (k + 1) + i)
        x, y = torch.cat([x, *extra]), torch.cat([y] * (copies + 1))
    vx, vy = make(n_per_class // 2)
    return TrainSet(x, y, torch.tensor(versions)), TensorSet(vx, vy)


def model(seed: int = 0, dropout: float = 0.0, arch: str = "tinyvgg"):
    torch.manual_seed(seed)
    spec = ModelSpec(kind="zoo", arch=arch, classes=["a", "b", "c"], mode="L", image_size=12, mean=[0.2], std=[0.3],
                     kwargs={"dropout": dropout, **({"hidden_units": 4} if arch == "tinyvgg" else {})})
    return build_classifier(spec)


def test_learns_and_reports_exact_per_sample_accuracy():
    train, val = data()
    m = model()
    result = fit(m, train, val, TrainParams(**{**FAST, "epochs": 8, "lr": 0.01}), seed=0)
    assert result.best_val_accuracy > 0.9
    # exact: a multiple of 1/len(val), and equal to a fresh evaluation of the restored best weights
    assert math.isclose(result.best_val_accuracy * len(val), round(result.best_val_accuracy * len(val)))
    again = evaluate(m, val, batch_size=7, device=torch.device("cpu"))
    assert again["accuracy"] == result.best_val_accuracy


def test_same_seed_same_history_other_seed_differs():
    cfg = TrainParams(**FAST)
    runs = []
    for seed in (1, 1, 2):
        train, val = data()
        runs.append(fit(model(seed, dropout=0.3), train, val, cfg, seed=seed).history)
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(runs[2])


def _rotated_val_labels(val: TensorSet, rotated):
    """A ``before_epoch`` hook: in the epochs where ``rotated(epoch)``, validation labels are
    rotated (c -> c + 1), so a net learning the true labels scores badly on them."""
    true = val.labels.clone()

    def hook(epoch: int, _model) -> None:
        val.labels.copy_((true + 1) % 3 if rotated(epoch) else true)

    return hook, true


def _fit_recording_weights(m, train, val, cfg, **kw):
    """fit, plus a copy of the weights as they were at the end of every epoch."""
    states: dict[int, dict[str, torch.Tensor]] = {}

    def on_epoch(row):  # runs after the epoch's validation, before any restore
        states[int(row["epoch"])] = copy.deepcopy(m.state_dict())

    return fit(m, train, val, cfg, seed=0, on_epoch=on_epoch, **kw), states


def _best_epoch(history) -> int:
    """1-based epoch of the first best row: higher val accuracy, then lower val loss, wins."""
    return 1 + max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], -history[i]["val_loss"]))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


K = 5  # validation can improve up to this epoch only


def _bad_at_2_and_after_k(epoch: int) -> bool:
    """Epoch 2 is a setback (so the counter of bad epochs must restart when epoch 3 improves) and
    nothing after K can improve on epochs <= K."""
    return epoch == 2 or epoch > K


def test_early_stopping_ends_patience_epochs_after_the_best_and_restores_it():
    train, val = data()
    hook, true = _rotated_val_labels(val, _bad_at_2_and_after_k)
    m = model()
    patience = 3
    cfg = TrainParams(**{**FAST, "epochs": 30, "lr": 0.01, "early_stopping_patience": patience, "device": "cpu"})
    result, states = _fit_recording_weights(m, train, val, cfg, before_epoch=hook)
    h = result.history
    best = _best_epoch(h)
    # the construction worked: a setback at epoch 2, the best after it but by epoch K, nothing after
    # K comes close
    assert h[1]["val_accuracy"] < h[0]["val_accuracy"] and 2 < best <= K, h
    assert all(r["val_accuracy"] < h[best - 1]["val_accuracy"] for r in h[K:]), h
    assert result.best_epoch == best
    assert result.stopped_early is True
    assert len(h) == best + patience  # epochs best+1 .. best+patience did not improve, then it stopped
    assert [r["epoch"] for r in h] == list(range(1, best + patience + 1))
    # the model holds the best epoch's weights, not the last epoch's (which differ: training went on)
    assert not _same_weights(states[best], states[len(h)])
    assert _same_weights(m.state_dict(), states[best])
    again = evaluate(m, TensorSet(val.images, true), batch_size=64, device=torch.device("cpu"))
    assert again["accuracy"] == result.best_val_accuracy == h[best - 1]["val_accuracy"]


def test_without_patience_every_epoch_runs_and_the_best_is_still_restored():
    train, val = data()
    hook, _ = _rotated_val_labels(val, _bad_at_2_and_after_k)
    m = model()
    epochs = K + 4
    cfg = TrainParams(**{**FAST, "epochs": epochs, "lr": 0.01, "early_stopping_patience": None, "device": "cpu"})
    result, states = _fit_recording_weights(m, train, val, cfg, before_epoch=hook)
    best = _best_epoch(result.history)
    assert best <= K
    assert len(result.history) == epochs and result.stopped_early is False
    assert result.best_epoch == best
    assert not _same_weights(states[best], states[epochs])
    assert _same_weights(m.state_dict(), states[best])


@pytest.mark.parametrize("scheduler", ["none", "step", "cosine", "plateau", "onecycle"])
@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_and_scheduler_trains(optimizer: str, scheduler: str):
    train, val = data(n_per_class=8)
    cfg = TrainParams(**{**FAST, "epochs": 2, "optimizer": optimizer, "scheduler": scheduler, "step_size": 1})
    result = fit(model(), train, val, cfg, seed=0)
    assert len(result.history) == 2 and all(math.isfinite(r["train_loss"]) for r in result.history)
    if scheduler in ("step", "cosine"):
        assert result.history[1]["lr"] < result.history[0]["lr"]


def test_options_bf16_channels_last_clip_accumulate_focal_weights_kaiming():
    train, val = data(copies=2)
    cfg = TrainParams(**{**FAST, "epochs": 3, "precision": "bf16", "channels_last": True, "grad_clip": 1.0,
                         "accumulation_steps": 3, "loss": "focal", "class_weights": "balanced", "init": "kaiming",
                         "lr": 0.01})
    result = fit(model(arch="simple_cnn", dropout=0.5), train, val, cfg, seed=0)
    assert result.best_val_accuracy > 0.5


def test_accumulation_matches_a_bigger_batch():
    """2 accumulated batches of 8 = 1 batch of 16, for a net without batch statistics."""
    outs = []
    for batch, acc in ((16, 1), (8, 2)):
        train, val = data(n_per_class=16)
        m = model(dropout=0.0)
        fit(m, train, val, TrainParams(**{**FAST, "epochs": 1, "batch_size": batch, "accumulation_steps": acc,
                                           "optimizer": "sgd", "scheduler": "none", "momentum": 0.0}), seed=0)
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)


def test_focal_loss_and_balanced_weights():
    logits, target = torch.randn(6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, target), F.cross_entropy(logits, target))
    assert FocalLoss(gamma=2.0)(logits, target) < F.cross_entropy(logits, target)
    w = balanced_class_weights(torch.tensor([0, 0, 0, 1]), 2)
    torch.testing.assert_close(w, torch.tensor([4 / 6, 2.0]))


def test_fp16_on_cpu_is_a_clear_error():
    train, val = data(n_per_class=4)
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        fit(model(), train, val, TrainParams(**{**FAST, "precision": "fp16", "device": "cpu"}), seed=0)


def test_checkpoint_from_other_params_is_ignored(tmp_path: Path):
    train, val = data(n_per_class=4)
    ckpt = tmp_path / "c.pt"
    fit(model(), train, val, TrainParams(**{**FAST, "epochs": 1}), seed=0, checkpoint=ckpt, fingerprint="A")
    assert load_checkpoint(ckpt, "A")["epoch"] == 1
    assert load_checkpoint(ckpt, "B") is None
    ckpt.write_bytes(b"not a checkpoint")
    assert load_checkpoint(ckpt, "A") is None


RESUME_SCRIPT = """
import sys, json, torch
sys.path.insert(0, {tests!r})
from test_engine import data, model, FAST
from cnnlab.config import TrainParams
from cnnlab.engine import fit
import cnnlab.engine as engine
slow = int(sys.argv[2])
if slow:  # give the parent time to kill us between epochs
    real = engine.evaluate
    def evaluate(*a, **k):
        import time; time.sleep(slow / 10); return real(*a, **k)
    engine.evaluate = evaluate
train, val = data(copies=1)
cfg = TrainParams(**{{**FAST, "epochs": 6, "lr": 0.01}})
r = fit(model(dropout=0.5), train, val, cfg, seed=3, checkpoint=__import__("pathlib").Path(sys.argv[1]), fingerprint="f")
print(json.dumps({{"history": [{{k: v for k, v in h.items() if k != "epoch_seconds"}} for h in r.history],
                  "resumed": r.resumed_from_epoch}}))
"""


def test_killed_run_resumes_to_the_same_result(tmp_path: Path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=str(Path(__file__).parent)))
    full = subprocess.run([sys.executable, str(script), str(tmp_path / "full.pt"), "0"], capture_output=True,
                          text=True, check=True)
    ckpt = tmp_path / "killed.pt"
    proc = subprocess.Popen([sys.executable, str(script), str(ckpt), "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (load_checkpoint(ckpt, "f") or {}).get("epoch", 0) < 2:
        time.sleep(0.1)
    proc.kill()  # SIGKILL: no chance to clean up, as after a crash
    proc.wait()
    assert 2 <= load_checkpoint(ckpt, "f")["epoch"] < 6
    resumed = subprocess.run([sys.executable, str(script), str(ckpt), "0"], capture_output=True, text=True, check=True)
    a = __import__("json").loads(full.stdout.strip().splitlines()[-1])
    b = __import__("json").loads(resumed.stdout.strip().splitlines()[-1])
    assert b["resumed"] >= 2
    assert a["history"] == b["history"]


def test_checkpoint_round_trips_scaler_and_rng_state(tmp_path: Path):
    """What a GPU run needs to resume exactly: the GradScaler's scale and the RNG states."""
    from cnnlab.engine import _Progress, _restore, _save_checkpoint

    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    torch.manual_seed(123)
    _save_checkpoint(tmp_path / "c.pt", "fp", _Progress(epoch=3, best_state=m.state_dict()), m, opt, None, scaler,
                     torch.device("cpu"), {"run_id": "r"})
    expected = torch.rand(3)
    state = load_checkpoint(tmp_path / "c.pt", "fp")
    assert state["epoch"] == 3 and state["extra"] == {"run_id": "r"} and state["cuda_rng"] is None
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0)
    torch.manual_seed(0)
    run = _restore(state, model(seed=1), torch.optim.SGD(m.parameters(), lr=0.1), None, fresh, torch.device("cpu"))
    assert run.epoch == 3 and fresh.get_scale() == 1024.0 and fresh.state_dict()["growth_interval"] == 7
    assert torch.equal(torch.rand(3), expected)  # the global RNG continues where it was saved
