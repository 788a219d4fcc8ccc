"""The training engine on tiny, learnable tensor data (real training, small sizes)."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cnnlab.config import FitParams
from cnnlab.data.tensors import TensorSet, TrainSet
from cnnlab.models.classifier import ModelSpec, build_classifier
from cnnlab.training.checkpoint import Checkpointing, load_checkpoint
from cnnlab.training.engine import Hooks, fit, validate
from cnnlab.training.losses import FocalLoss, balanced_class_weights, class_weights, make_criterion
from helpers.engine_data import FAST, data, fit_params, model

def test_learns_and_reports_exact_per_sample_accuracy():
    train, val = data()
    m = model()
    result = fit(m, train, val, fit_params(**{**FAST, "epochs": 8, "lr": 0.01}), seed=0)
    assert result.best_val_accuracy > 0.9
    # exact: a multiple of 1/len(val), and equal to a fresh evaluation of the restored best weights
    assert math.isclose(result.best_val_accuracy * len(val), round(result.best_val_accuracy * len(val)))
    again = validate(m, val, batch_size=7, device=torch.device("cpu"))
    assert again["accuracy"] == result.best_val_accuracy


def test_same_seed_same_history_other_seed_differs():
    cfg = fit_params(**FAST)
    runs = []
    for seed in (1, 1, 2):
        train, val = data()
        runs.append(fit(model(seed, dropout=0.3), train, val, cfg, seed=seed).history)
    strip = lambda h: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]  # noqa: E731
    assert strip(runs[0]) == strip(runs[1])
    assert strip(runs[0]) != strip(runs[2])


def test_accumulation_matches_a_bigger_batch():
    """2 accumulated batches of 8 = 1 batch of 16, for a net without batch statistics."""
    outs = []
    for batch, acc in ((16, 1), (8, 2)):
        train, val = data(n_per_class=16)
        m = model(dropout=0.0)
        fit(m, train, val, fit_params(**{**FAST, "epochs": 1, "batch_size": batch, "accumulation_steps": acc,
                                           "optimizer": "sgd", "scheduler": "none", "momentum": 0.0}), seed=0)
        outs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-6)


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

    return fit(m, train, val, cfg, seed=0, hooks=Hooks(on_epoch=on_epoch, **kw)), states


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
    cfg = fit_params(**{**FAST, "epochs": 30, "lr": 0.01, "early_stopping_patience": patience, "device": "cpu"})
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
    again = validate(m, TensorSet(val.images, true), batch_size=64, device=torch.device("cpu"))
    assert again["accuracy"] == result.best_val_accuracy == h[best - 1]["val_accuracy"]


def test_without_patience_every_epoch_runs_and_the_best_is_still_restored():
    train, val = data()
    hook, _ = _rotated_val_labels(val, _bad_at_2_and_after_k)
    m = model()
    epochs = K + 4
    cfg = fit_params(**{**FAST, "epochs": epochs, "lr": 0.01, "early_stopping_patience": None, "device": "cpu"})
    result, states = _fit_recording_weights(m, train, val, cfg, before_epoch=hook)
    best = _best_epoch(result.history)
    assert best <= K
    assert len(result.history) == epochs and result.stopped_early is False
    assert result.best_epoch == best
    assert not _same_weights(states[best], states[epochs])
    assert _same_weights(m.state_dict(), states[best])


# --- learning-rate schedules: the `lr` column against closed forms ------------------------------

LR = 0.01


def _lr_column(scheduler: str, *, epochs: int, batch_size: int = 16, param_groups=None, **kw) -> list[float]:
    train, val = data(n_per_class=8)  # 24 images
    m = model()
    groups = param_groups(m) if param_groups else None
    cfg = fit_params(**{**FAST, "epochs": epochs, "batch_size": batch_size, "optimizer": "sgd", "lr": LR,
                         "scheduler": scheduler, "device": "cpu", **kw})
    history = fit(m, train, val, cfg, seed=0, hooks=Hooks(param_groups=groups)).history
    assert [r["epoch"] for r in history] == list(range(1, epochs + 1))
    return [r["lr"] for r in history]


def test_no_scheduler_keeps_the_rate():
    assert _lr_column("none", epochs=4) == [LR] * 4


def test_step_scheduler_decays_by_gamma_every_step_size_epochs():
    lrs = _lr_column("step", epochs=7, step_size=3, gamma=0.5)
    # the rate epoch e trained with: lr * gamma ** floor((e - 1) / step_size)
    assert lrs == pytest.approx([LR * 0.5 ** ((e - 1) // 3) for e in range(1, 8)], rel=1e-12)
    assert lrs == pytest.approx([LR, LR, LR, LR / 2, LR / 2, LR / 2, LR / 4], rel=1e-12)


def test_cosine_scheduler_follows_half_a_cosine_to_zero_over_the_epochs():
    epochs = 6
    lrs = _lr_column("cosine", epochs=epochs)
    # eta_min + (lr - eta_min) * (1 + cos(pi * t / T)) / 2, eta_min = 0, t = e - 1, T = epochs
    want = [LR * (1 + math.cos(math.pi * (e - 1) / epochs)) / 2 for e in range(1, epochs + 1)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[0] == LR and lrs[3] == pytest.approx(LR / 2)


def _one_cycle(step: int, total: int, peak: float) -> float:
    """OneCycleLR's rate after ``step`` optimizer steps (Smith & Topin 2017, torch's defaults:
    30% warm-up from peak/25 to peak, then a cosine down to peak/25/1e4, both cosine-annealed)."""
    start, low = peak / 25, peak / 25 / 1e4
    warm_end = 0.3 * total - 1  # the step at which the peak is reached
    if step <= warm_end:
        pct, a, b = step / warm_end, start, peak
    else:
        pct, a, b = (step - warm_end) / (total - 1 - warm_end), peak, low
    return b + (a - b) * (1 + math.cos(math.pi * pct)) / 2


@pytest.mark.parametrize("accumulation", [1, 2])
def test_onecycle_steps_every_optimizer_step(accumulation: int):
    """24 images in batches of 8: 3 batches an epoch, so ceil(3 / accumulation) optimizer steps.
    The `lr` column is the rate after each epoch's last step; stepped once an epoch instead, the
    rate would still be warming up at the end."""
    epochs, steps = 4, math.ceil(3 / accumulation)
    lrs = _lr_column("onecycle", epochs=epochs, batch_size=8, accumulation_steps=accumulation)
    want = [_one_cycle(e * steps, epochs * steps, LR) for e in range(1, epochs + 1)]
    assert lrs == pytest.approx(want, rel=1e-9)
    assert lrs[-1] < LR / 10 < max(lrs)  # annealed by the end of the run, after peaking


def test_onecycle_keeps_each_groups_own_peak():
    """Discriminative rates (fine_tune's param groups) survive OneCycle: each group cycles up to its
    own rate, the first group's rate is the one recorded."""
    def groups(m):
        params = list(m.parameters())
        return [{"params": params[:2], "lr": LR / 10}, {"params": params[2:], "lr": LR}]

    lrs = _lr_column("onecycle", epochs=3, batch_size=8, param_groups=groups)
    assert lrs == pytest.approx([_one_cycle(3 * e, 9, LR / 10) for e in (1, 2, 3)], rel=1e-9)


def test_plateau_scheduler_cuts_the_rate_once_validation_loss_stalls():
    """An optimizer holding only a parameter outside the model changes nothing, so validation loss
    is exactly flat. With patience = max(1, step_size // 3) = 2: epoch 1 sets the best, epochs
    2, 3, 4 are bad, and after the third (> patience) the rate is cut; again after 5, 6, 7."""
    outside = torch.nn.Parameter(torch.zeros(1))
    lrs = _lr_column("plateau", epochs=10, step_size=6, gamma=0.5, param_groups=lambda m: [{"params": [outside]}])
    # lr * gamma ** max(0, floor((e - 2) / (patience + 1)))
    assert lrs == pytest.approx([LR * 0.5 ** max(0, (e - 2) // 3) for e in range(1, 11)], rel=1e-12)
    assert lrs == pytest.approx([LR] * 4 + [LR / 2] * 3 + [LR / 4] * 3, rel=1e-12)


# --- optimizers, losses, class weights, clipping: one full-batch step against the hand gradient ---

def _imbalanced() -> tuple[TrainSet, TensorSet]:
    """12 images of class 0, 6 of class 1, 3 of class 2."""
    train, val = data(n_per_class=12)
    keep = torch.cat([torch.arange(0, 12), torch.arange(12, 18), torch.arange(24, 27)])
    return TrainSet(train.images[keep], train.labels[keep], torch.arange(len(keep))[:, None]), val


def _hand_gradient(loss_fn, train: TrainSet) -> list[torch.Tensor]:
    """d loss / d params at the initial weights of `model()`, on the whole training set."""
    m = model()
    m.train()
    loss = loss_fn(m(train.images), train.labels)
    return [g.detach() for g in torch.autograd.grad(loss, list(m.parameters()))]


def _one_step(train: TrainSet, val: TensorSet, **options) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights before, weights after) one optimizer step on one batch holding the whole set; the
    loss is unweighted unless ``options`` set class_weights (the set is imbalanced on purpose)."""
    m = model()
    before = [p.detach().clone() for p in m.parameters()]
    cfg = fit_params(**{**FAST, "epochs": 1, "batch_size": len(train), "optimizer": "sgd", "momentum": 0.0,
                         "weight_decay": 0.0, "scheduler": "none", "lr": 0.5, "device": "cpu",
                         "class_weights": "none", **options})
    fit(m, train, val, cfg, seed=0)
    return before, [p.detach() for p in m.parameters()]


def _nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """-log p(true class) per sample."""
    return -F.log_softmax(logits, 1).gather(1, y[:, None]).squeeze(1)


def _balanced_by_hand(y: torch.Tensor) -> torch.Tensor:
    """n / (k * n_c) from a count by hand."""
    counts = [int((y == c).sum()) for c in range(3)]
    return torch.tensor([len(y) / (3 * n_c) for n_c in counts])


def _focal_terms(logits, y, gamma):
    p_t = F.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    return -((1 - p_t) ** gamma) * torch.log(p_t)


def _smoothed_ce(logits, y, eps):
    """Cross-entropy against (1 - eps) * one_hot + eps / C, averaged over the samples."""
    q = (1 - eps) * F.one_hot(y, 3).float() + eps / 3
    return -(q * F.log_softmax(logits, 1)).sum(1).mean()


def _weighted_mean(terms, y):
    w = _balanced_by_hand(y)[y]
    return (w * terms).sum() / w.sum()


LOSS_OPTIONS = {
    "plain": ({}, lambda z, y: _nll(z, y).mean()),
    "balanced_weights": ({"class_weights": "balanced"}, lambda z, y: _weighted_mean(_nll(z, y), y)),
    "focal": ({"loss": "focal", "focal_gamma": 2.0}, lambda z, y: _focal_terms(z, y, 2.0).mean()),
    "focal_balanced": ({"loss": "focal", "focal_gamma": 1.5, "class_weights": "balanced"},
                       lambda z, y: _weighted_mean(_focal_terms(z, y, 1.5), y)),
    "label_smoothing": ({"label_smoothing": 0.2}, lambda z, y: _smoothed_ce(z, y, 0.2)),
}


@pytest.mark.parametrize("case", list(LOSS_OPTIONS))
def test_loss_options_give_the_update_of_their_formula(case: str):
    """Plain SGD, one step on the whole (imbalanced) set: w1 - w0 = -lr * grad of the configured loss."""
    options, loss_fn = LOSS_OPTIONS[case]
    train, val = _imbalanced()
    before, after = _one_step(train, val, **options)
    for w0, w1, g in zip(before, after, _hand_gradient(loss_fn, train), strict=True):
        torch.testing.assert_close(w1 - w0, -0.5 * g, rtol=1e-4, atol=1e-7)


def test_grad_clip_bounds_the_step_to_lr_times_the_max_norm():
    train, val = _imbalanced()
    clip = 1e-3
    grads = _hand_gradient(lambda z, y: _nll(z, y).mean(), train)
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    assert norm > 100 * clip  # so the clip matters
    before, after = _one_step(train, val, grad_clip=clip)
    step = torch.sqrt(sum(((w1 - w0) ** 2).sum() for w0, w1 in zip(before, after)))
    assert step <= 0.5 * clip * (1 + 1e-4)  # ||update|| <= lr * grad_clip
    for w0, w1, g in zip(before, after, grads, strict=True):  # the gradient's direction, rescaled
        torch.testing.assert_close(w1 - w0, -0.5 * g * (clip / norm), rtol=1e-3, atol=3e-8)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "rmsprop"])
def test_each_optimizer_takes_its_own_first_step(optimizer: str):
    """The first update of each rule, by hand, from the gradient g at the initial weights w:
    sgd (Nesterov, momentum m): -lr (1 + m) g; adam: -lr g / (|g| + eps) (its bias-corrected
    moments are g and g^2), with L2 decay folded into g; adamw: w (1 - lr wd) - lr g / (|g| + eps);
    rmsprop (alpha 0.99, momentum on): -lr g / (sqrt(0.01) |g| + eps)."""
    train, val = _imbalanced()
    lr, mom = 0.01, 0.9
    wd = 0.1 if optimizer in ("adam", "adamw") else 0.0
    before, after = _one_step(train, val, optimizer=optimizer, lr=lr, weight_decay=wd, momentum=mom)
    grads = _hand_gradient(lambda z, y: _nll(z, y).mean(), train)
    eps, compared = 1e-8, 0
    for w0, w1, g in zip(before, after, grads, strict=True):
        if optimizer == "sgd":
            torch.testing.assert_close(w1, w0 - lr * (1 + mom) * g, rtol=1e-4, atol=1e-7)
            continue
        if optimizer == "adam":
            g = g + wd * w0
            want = w0 - lr * g / (g.abs() + eps)
        elif optimizer == "adamw":
            want = w0 * (1 - lr * wd) - lr * g / (g.abs() + eps)
        else:
            want = w0 - lr * g / (0.1 * g.abs() + eps)
        # These rules divide g by |g|: where g is within rounding of 0 its sign is the summation
        # order's, so compare where it is clearly not.
        clear = g.abs() > 1e-5
        compared += int(clear.sum())
        torch.testing.assert_close(w1[clear], want[clear], rtol=1e-4, atol=lr * 1e-4)
    assert optimizer == "sgd" or compared > sum(w.numel() for w in before) / 2


def _gradient_at(weights: list[torch.Tensor], train: TrainSet) -> list[torch.Tensor]:
    """d (mean cross-entropy) / d params of `model()` holding ``weights``, on the whole set."""
    m = model()
    with torch.no_grad():
        for p, w in zip(m.parameters(), weights, strict=True):
            p.copy_(w)
    m.train()
    loss = _nll(m(train.images), train.labels).mean()
    return [g.detach() for g in torch.autograd.grad(loss, list(m.parameters()))]


@pytest.mark.parametrize("optimizer", ["sgd", "rmsprop"])
def test_second_step_carries_momentum_and_weight_decay(optimizer: str):
    """A first step cannot show momentum (its buffer starts at zero), so two full-batch steps,
    the second against the hand rule from the weights the first left (torch's documented rules,
    d = g + wd w): sgd, Nesterov: b = m b + d, w -= lr (d + m b); rmsprop (alpha 0.99):
    v = 0.99 v + 0.01 d^2, b = m b + d / (sqrt(v) + eps), w -= lr b."""
    train, val = _imbalanced()
    lr, mom, wd, eps = 0.01, 0.9, 0.05, 1e-8
    m = model()
    w0 = [p.detach().clone() for p in m.parameters()]
    after: dict[int, list[torch.Tensor]] = {}

    def on_epoch(row: dict[str, float]) -> None:  # before fit restores the best epoch's weights
        after[int(row["epoch"])] = [p.detach().clone() for p in m.parameters()]

    cfg = fit_params(**{**FAST, "epochs": 2, "batch_size": len(train), "optimizer": optimizer, "lr": lr,
                         "momentum": mom, "weight_decay": wd, "scheduler": "none", "device": "cpu",
                         "class_weights": "none"})  # the hand rule's loss is unweighted
    fit(m, train, val, cfg, seed=0, hooks=Hooks(on_epoch=on_epoch))
    w1, w2 = after[1], after[2]
    g0, g1 = _gradient_at(w0, train), _gradient_at(w1, train)
    compared = 0
    for a0, a1, a2, x0, x1 in zip(w0, w1, w2, g0, g1, strict=True):
        d0, d1 = x0 + wd * a0, x1 + wd * a1
        if optimizer == "sgd":
            b1 = d0
            torch.testing.assert_close(a1, a0 - lr * (d0 + mom * b1), rtol=1e-4, atol=1e-7)
            b2 = mom * b1 + d1
            torch.testing.assert_close(a2, a1 - lr * (d1 + mom * b2), rtol=1e-4, atol=1e-7)
            compared += a0.numel()
            continue
        v1 = 0.01 * d0 ** 2
        b1 = d0 / (v1.sqrt() + eps)
        v2 = 0.99 * v1 + 0.01 * d1 ** 2
        b2 = mom * b1 + d1 / (v2.sqrt() + eps)
        # b1 is d0 / |d0| / 0.1: where d0 is within rounding of 0 its sign is the summation order's
        clear = d0.abs() > 1e-5
        compared += int(clear.sum())
        torch.testing.assert_close(a2[clear], (a1 - lr * b2)[clear], rtol=1e-4, atol=lr * 1e-3)
    assert compared > sum(w.numel() for w in w0) / 2


# --- the criterion itself, on a small tensor --------------------------------------------------

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3], [-1.0, 3.0, 0.0], [1.0, 1.0, 1.0], [0.0, -2.0, 2.5]])
TARGET = torch.tensor([0, 2, 1, 0, 0])


def _p(i: int, c: int) -> float:
    row = LOGITS[i].tolist()
    return math.exp(row[c]) / sum(math.exp(v) for v in row)


def test_balanced_class_weights_are_n_over_k_times_n_c():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2])
    torch.testing.assert_close(balanced_class_weights(labels, 3), torch.tensor([7 / 12, 7 / 6, 7 / 3]))
    torch.testing.assert_close(balanced_class_weights(torch.tensor([0, 0, 0, 1]), 2), torch.tensor([4 / 6, 2.0]))


def test_auto_class_weights_turn_on_for_a_4_to_1_imbalance_and_not_for_a_balanced_set():
    four_to_one = torch.tensor([0] * 40 + [1] * 10)
    balanced = torch.tensor([0] * 20 + [1] * 20)
    torch.testing.assert_close(class_weights("auto", four_to_one, 2), balanced_class_weights(four_to_one, 2))
    assert class_weights("auto", balanced, 2) is None
    assert class_weights("auto", torch.tensor([0] * 19 + [1] * 10), 2) is None  # 1.9x: below the threshold
    assert class_weights("none", four_to_one, 2) is None
    torch.testing.assert_close(class_weights("balanced", balanced, 2), torch.ones(2))


def test_fit_weighs_an_imbalanced_training_set_under_auto(caplog: pytest.LogCaptureFixture):
    train, val = data(n_per_class=8)
    keep = torch.cat([torch.arange(0, 8), torch.arange(8, 10), torch.arange(16, 18)])  # 8 : 2 : 2 images
    imbalanced = TrainSet(train.images[keep], train.labels[keep], torch.arange(len(keep))[:, None])
    caplog.set_level(logging.INFO, logger="cnnlab")
    fit(model(), imbalanced, val, fit_params(**{**FAST, "epochs": 1}), seed=0)
    fit(model(), train, val, fit_params(**{**FAST, "epochs": 1}), seed=0)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("class_weights auto")]
    assert said == ["class_weights auto: balanced (largest class 8 images, smallest 2)",
                    "class_weights auto: none (largest class 8 images, smallest 8)"]


def test_criteria_match_their_formulas_by_hand():
    n = len(TARGET)
    nll = [-math.log(_p(i, int(TARGET[i]))) for i in range(n)]
    w = [5 / (3 * 3), 5 / (3 * 1), 5 / (3 * 1)]  # TARGET has 3, 1, 1 of classes 0, 1, 2
    weight = balanced_class_weights(TARGET, 3)
    torch.testing.assert_close(weight, torch.tensor(w))

    plain = make_criterion(FitParams(), None)(LOGITS, TARGET)
    assert plain.item() == pytest.approx(sum(nll) / n, rel=1e-6)
    weighted = make_criterion(FitParams(class_weights="balanced"), weight)(LOGITS, TARGET)
    wy = [w[int(t)] for t in TARGET]
    assert weighted.item() == pytest.approx(sum(a * b for a, b in zip(wy, nll)) / sum(wy), rel=1e-6)
    assert weighted.item() != pytest.approx(plain.item(), rel=1e-3)
    # A minibatch's weights need not sum to its size (they come from the whole training set): the
    # weighted mean divides by the weights' sum, not by the count.
    other = torch.tensor([0.5, 2.0, 4.0])
    wo = [other[int(t)].item() for t in TARGET]
    assert sum(wo) != n
    got_ce = make_criterion(FitParams(class_weights="balanced"), other)(LOGITS, TARGET).item()
    assert got_ce == pytest.approx(sum(a * b for a, b in zip(wo, nll)) / sum(wo), rel=1e-6)

    eps = 0.1
    smooth = [(1 - eps) * nll[i] + eps / 3 * sum(-math.log(_p(i, c)) for c in range(3)) for i in range(n)]
    smoothed = make_criterion(FitParams(label_smoothing=eps), None)(LOGITS, TARGET)
    assert smoothed.item() == pytest.approx(sum(smooth) / n, rel=1e-6)

    gamma = 2.0
    focal = [(1 - _p(i, int(TARGET[i]))) ** gamma * nll[i] for i in range(n)]
    got = make_criterion(FitParams(loss="focal", focal_gamma=gamma), None)
    assert isinstance(got, FocalLoss)
    assert got(LOGITS, TARGET).item() == pytest.approx(sum(focal) / n, rel=1e-6)
    got_w = make_criterion(FitParams(loss="focal", focal_gamma=gamma), weight)(LOGITS, TARGET)
    assert got_w.item() == pytest.approx(sum(a * b for a, b in zip(wy, focal)) / sum(wy), rel=1e-6)
    got_o = make_criterion(FitParams(loss="focal", focal_gamma=gamma), other)(LOGITS, TARGET)
    assert got_o.item() == pytest.approx(sum(a * b for a, b in zip(wo, focal)) / sum(wo), rel=1e-6)
    # gamma 0 is plain cross-entropy
    assert FocalLoss(gamma=0.0)(LOGITS, TARGET).item() == pytest.approx(sum(nll) / n, rel=1e-6)


@pytest.mark.parametrize(("precision", "channels_last"), [("fp32", False), ("bf16", False), ("fp32", True),
                                                          ("bf16", True)])
def test_precision_and_channels_last_reach_the_convolutions(precision: str, channels_last: bool):
    """What the first convolution gets and makes, in training and validation: its input in
    channels-last memory when asked (3 channels, so the two layouts differ), its output in bf16
    under bf16 autocast and in float32 otherwise."""
    train, val = data(n_per_class=4)
    rgb = lambda s: s.images.repeat(1, 3, 1, 1)  # noqa: E731
    train, val = TrainSet(rgb(train), train.labels, train.versions), TensorSet(rgb(val), val.labels)
    torch.manual_seed(0)
    m = build_classifier(ModelSpec(kind="scratch", arch="tinyvgg", classes=["a", "b", "c"], mode="RGB", image_size=12,
                                   mean=[0.2] * 3, std=[0.3] * 3, kwargs={"hidden_units": 4}))
    seen = []
    first_conv = next(mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda mod, inp, out: seen.append(
        (m.training, out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last), inp[0].is_contiguous())))
    cfg = fit_params(**{**FAST, "epochs": 1, "precision": precision, "channels_last": channels_last,
                         "device": "cpu"})
    fit(m, train, val, cfg, seed=0)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert any(training for training, *_ in seen) and not all(training for training, *_ in seen)
    for _, got_dtype, is_cl, is_plain in seen:
        assert got_dtype == dtype
        assert (is_cl, is_plain) == ((True, False) if channels_last else (False, True))


def test_fp16_on_cpu_is_a_clear_error():
    train, val = data(n_per_class=4)
    with pytest.raises(ValueError, match="fp16.*needs CUDA"):
        fit(model(), train, val, fit_params(**{**FAST, "precision": "fp16", "device": "cpu"}), seed=0)


def test_checkpoint_from_other_params_is_ignored(tmp_path: Path):
    train, val = data(n_per_class=4)
    ckpt = tmp_path / "c.pt"
    fit(model(), train, val, fit_params(**{**FAST, "epochs": 1}), seed=0, checkpoint=Checkpointing(ckpt, "A"))
    assert load_checkpoint(ckpt, "A")["epoch"] == 1
    assert load_checkpoint(ckpt, "B") is None
    ckpt.write_bytes(b"not a checkpoint")
    assert load_checkpoint(ckpt, "A") is None


RESUME_SCRIPT = """
import sys, json, torch
sys.path.insert(0, {tests!r})
from helpers.engine_data import data, model, fit_params, FAST
from cnnlab.training.checkpoint import Checkpointing
from cnnlab.training.engine import fit
import cnnlab.training.engine as engine
slow = int(sys.argv[2])
if slow:  # give the parent time to kill us between epochs
    real = engine.validate
    def evaluate(*a, **k):
        import time; time.sleep(slow / 10); return real(*a, **k)
    engine.validate = evaluate
train, val = data(copies=1)
cfg = fit_params(**{{**FAST, "epochs": 6, "lr": 0.01}})
r = fit(model(dropout=0.5), train, val, cfg, seed=3, checkpoint=Checkpointing(__import__("pathlib").Path(sys.argv[1]), "f"))
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
    from cnnlab.training.checkpoint import Progress, restore, save_checkpoint

    m = model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    torch.manual_seed(123)
    save_checkpoint(tmp_path / "c.pt", "fp", Progress(epoch=3, best_state=m.state_dict()), m, opt, None, scaler,
                     torch.device("cpu"), {"run_id": "r"})
    expected = torch.rand(3)
    state = load_checkpoint(tmp_path / "c.pt", "fp")
    assert state["epoch"] == 3 and state["extra"] == {"run_id": "r"} and state["cuda_rng"] is None
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0)
    torch.manual_seed(0)
    run = restore(state, model(seed=1), torch.optim.SGD(m.parameters(), lr=0.1), None, fresh, torch.device("cpu"))
    assert run.epoch == 3 and fresh.get_scale() == 1024.0 and fresh.state_dict()["growth_interval"] == 7
    assert torch.equal(torch.rand(3), expected)  # the global RNG continues where it was saved
