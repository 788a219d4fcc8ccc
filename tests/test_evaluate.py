"""The evaluate stage: its statistics against hand-computed values, and the stage end to end on
tiny real models with a real MLflow store."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scipy.stats import binomtest


from cnnlab.config import EvaluateParams, SplitParams
from cnnlab.data.shards import read_manifest
from cnnlab.data.split import run_split
from cnnlab.data.tensors import load_split, split_classes
from cnnlab.training.engine import predict_logits
from cnnlab.evaluation.calibration import (
    T_MAX,
    T_MIN,
    fit_objective,
    fit_temperature,
    log_probabilities,
    nll,
    scaled,
)
from cnnlab.evaluation.scoring import (
    VariantResult,
    best_by_validation,
    bootstrap_interval,
    comparison_markdown,
    comparison_table,
    confusion_matrix,
    ensemble_probabilities,
    holm,
    macro_f1,
    mcnemar,
    mcnemar_pairs,
    mean_cross_entropy,
    per_class_metrics,
    score,
)
from cnnlab.models.classifier import ModelSpec, build_classifier, load_classifier, save_classifier
from cnnlab.tracking.runs import tracked_run

REPO = Path(__file__).resolve().parents[1]


# --- statistics ------------------------------------------------------------------------------

def _correct(n: int, accuracy: float) -> np.ndarray:
    return np.arange(n) < round(n * accuracy)


def test_bootstrap_interval_contains_the_estimate_narrows_with_data_and_is_seeded():
    small = bootstrap_interval(_correct(100, 0.8), samples=2000, confidence=0.95, seed=0)
    large = bootstrap_interval(_correct(10_000, 0.8), samples=2000, confidence=0.95, seed=0)
    for low, high in (small, large):
        assert low < 0.8 < high
    assert (large[1] - large[0]) < (small[1] - small[0]) / 5  # width ~ 1/sqrt(n): 10x narrower
    # The normal approximation: +-1.96 * sqrt(p(1-p)/n) = +-0.078 for n = 100.
    assert small[1] - small[0] == pytest.approx(2 * 1.96 * math.sqrt(0.8 * 0.2 / 100), rel=0.15)
    assert bootstrap_interval(_correct(100, 0.8), samples=2000, confidence=0.95, seed=0) == small
    wider = bootstrap_interval(_correct(100, 0.8), samples=2000, confidence=0.99, seed=0)
    assert wider[0] <= small[0] and wider[1] >= small[1]
    with pytest.raises(ValueError, match="no test examples"):
        bootstrap_interval(np.array([], dtype=bool), samples=100, confidence=0.95, seed=0)


def _paired(b: int, c: int, both: int = 7, neither: int = 3) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([True] * b + [False] * c + [True] * both + [False] * neither)
    other = np.array([False] * b + [True] * c + [True] * both + [False] * neither)
    return a, other


def test_mcnemar_is_the_exact_two_sided_binomial_test_and_symmetric():
    a, b = _paired(1, 5)
    result = mcnemar(a, b)
    # Under H0, b ~ Binomial(6, 1/2): p = 2 * P(X <= 1) = 2 * (1 + 6) / 64.
    assert (result.b, result.c) == (1, 5)
    assert result.p_value == pytest.approx(14 / 64)
    flipped = mcnemar(b, a)
    assert (flipped.b, flipped.c) == (5, 1) and flipped.p_value == pytest.approx(result.p_value)
    a, b = _paired(2, 9)
    expected = 2 * sum(math.comb(11, k) for k in range(3)) / 2**11
    assert mcnemar(a, b).p_value == pytest.approx(expected)
    assert mcnemar(*_paired(0, 0)).p_value == 1.0  # no discordant pairs: no evidence of a difference
    assert mcnemar(*_paired(4, 4)).p_value == pytest.approx(1.0)


def test_ensemble_averages_probabilities():
    p1 = np.array([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]])
    p2 = np.array([[0.0, 0.4, 0.6], [0.5, 0.5, 0.0]])
    mean = ensemble_probabilities([p1, p2])
    np.testing.assert_allclose(mean, [[0.3, 0.4, 0.3], [0.75, 0.25, 0.0]])
    np.testing.assert_allclose(mean.sum(axis=1), 1.0)
    assert mean[0].argmax() == 1  # soft voting can pick a class neither member ranked first
    with pytest.raises(ValueError, match="shape"):
        ensemble_probabilities([p1, p2[:, :2]])


def test_per_class_metrics_f1_and_confusion_on_a_hand_example():
    labels = np.array([0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 1, 1, 0])
    table = per_class_metrics(labels, predicted, ["a", "b", "c"])
    assert list(table["class"]) == ["a", "b", "c"]
    np.testing.assert_allclose(table["precision"], [1 / 2, 2 / 3, 0.0])  # c never predicted: 0, no warning
    np.testing.assert_allclose(table["recall"], [1 / 2, 1.0, 0.0])
    np.testing.assert_allclose(table["f1"], [1 / 2, 0.8, 0.0])
    assert list(table["support"]) == [2, 2, 1]
    assert macro_f1(labels, predicted, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    np.testing.assert_array_equal(confusion_matrix(labels, predicted, 4),
                                  [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_mean_cross_entropy_is_the_mean_negative_log_probability_of_the_truth():
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.0, 1.0]])
    labels = np.array([0, 1, 0])
    expected = -(math.log(0.5) + math.log(0.1) + math.log(1e-15)) / 3  # p = 0 clipped, not infinite
    assert mean_cross_entropy(probs, labels) == pytest.approx(expected)


def test_holm_adjustment():
    np.testing.assert_allclose(holm(np.array([0.01, 0.04, 0.03])), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(holm(np.array([0.5, 0.9])), [1.0, 1.0])
    assert len(holm(np.array([]))) == 0


def _result(name: str, probs: np.ndarray, labels: np.ndarray, val: float | None) -> VariantResult:
    return score(name, probs, labels, classes=["x", "y"], bootstrap_samples=200, confidence=0.9, seed=0,
                 val_accuracy=val, parameters=10)


def test_tables_pairs_and_best_variant():
    labels = np.array([0, 1, 0, 1])
    good = _result("good", np.eye(2)[labels], labels, 0.7)
    bad = _result("bad", np.eye(2)[1 - labels], labels, 0.9)
    tie = _result("tie", np.eye(2)[labels], labels, 0.9)
    assert best_by_validation([good, bad, tie]).name == "bad"  # by validation, first on ties; never test
    assert mcnemar_pairs(["a", "b", "c"], "ensemble", "b") == [("a", "b"), ("a", "c"), ("b", "c"), ("ensemble", "b")]
    assert mcnemar_pairs(["a", "b"], None, None) == [("a", "b")]
    table = comparison_table([good, bad])
    assert list(table.columns) == ["variant", "val_accuracy", "test_accuracy", "ci_low", "ci_high", "test_loss",
                                   "macro_f1", "parameters", "macs", "temperature", "test_loss_calibrated", "ece",
                                   "ece_calibrated", "coverage", "coverage_ci_low", "coverage_ci_high", "set_size",
                                   "tta_used", "tta_val_p", "test_accuracy_tta", "tta_ci_low", "tta_ci_high",
                                   "tta_test_p"]
    assert list(table["test_accuracy"]) == [1.0, 0.0]
    md = comparison_markdown(table, 0.9)
    assert "| variant" in md and "90% CI" in md and "100.00%" in md and "70.00%" in md


# --- the stage end to end --------------------------------------------------------------------

VARIANTS = ("scratch", "wide", "big")  # big reads 32 px: the test split is decoded per input size


@pytest.fixture
def workspace(tiny_idx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A split, three saved tiny classifiers (two with runs in a temp MLflow store, one whose run
    is elsewhere), their validation metrics and a params.yaml with a small bootstrap."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # the default artifact root ./mlruns lands here
    monkeypatch.setattr(sys, "path", [str(REPO / "pipeline"), *sys.path])  # for the script's `_common`
    mlflow.set_tracking_uri(uri)
    split = tmp_path / "split"
    run_split(tiny_idx, split, SplitParams(val_fraction=0.2, test_fraction=0.2, max_train_per_class=2,
                                           max_val_per_class=2, max_test_per_class=4, max_image_pixels=10_000,
                                           max_side=None, color_mode="auto"), seed=0)
    for i, (name, size, hidden) in enumerate(zip(VARIANTS, (28, 28, 32), (4, 6, 4))):
        torch.manual_seed(i)
        spec = ModelSpec(kind="scratch", arch="tinyvgg", classes=split_classes(split), mode="L", image_size=size,
                         mean=[0.3], std=[0.25], kwargs={"hidden_units": hidden})
        folder = tmp_path / "models" / name
        save_classifier(build_classifier(spec), spec, folder)
        if name == "big":
            run_id = "0" * 32  # trained against another store
        else:
            with tracked_run(experiment="evaltest", run_name=name, tags={"variant": name}, params={}) as run:
                run_id = run.info.run_id
        (folder / "run.json").write_text(json.dumps({"run_id": run_id, "variant": name,
                                                     "val_accuracy": [0.5, 0.7, 0.6][i]}))
    (tmp_path / "metrics").mkdir()
    params = {"base": {"seed": 7, "experiment": "evaltest"},
              "variants": {"scratch": {name: {} for name in VARIANTS}, "feature_extract": {}, "fine_tune": {},
                           "ensemble": {"ensemble": {}}},
              "evaluate": {"batch_size": 16, "bootstrap_samples": 200, "misclassified": 4}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return tmp_path


def _run_stage(ws: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # In-process, the script's logging set-up (`cnnlab.utils.logs.configure`) is undone after the test by
    # conftest's `cnnlab_logging` fixture; caplog sees the records meanwhile.
    caplog.set_level(logging.INFO, logger="cnnlab")
    spec = importlib.util.spec_from_file_location("evaluate_stage", REPO / "pipeline" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "evaluate_stage", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [
        "evaluate.py", "--params", str(ws / "params.yaml"), "--split", str(ws / "split"), "--models",
        str(ws / "models"), "--features", str(ws / "features"), "--out", str(ws / "evaluation"),
        "--metrics", str(ws / "metrics" / "evaluate.json"), "--plots", str(ws / "plots"),
        "--ensembles", str(ws / "ensembles.json")])
    module.main()


def test_stage_outputs_agree_with_the_models_and_mlflow(workspace: Path, monkeypatch, capsys, caplog):
    ws = workspace
    _run_stage(ws, monkeypatch, caplog)
    captured = capsys.readouterr()
    assert "| variant" in captured.out  # the Markdown table is printed
    assert any(r.levelno == logging.WARNING and f"run {'0' * 32} is not in the MLflow store" in r.getMessage()
               for r in caplog.records)  # warned, not failed

    # The table's accuracies are what the saved models predict.
    comparison = pd.read_csv(ws / "evaluation" / "comparison.csv")
    assert list(comparison["variant"]) == [*VARIANTS, "ensemble"]
    metrics = json.loads((ws / "metrics" / "evaluate.json").read_text())
    all_probs, ensemble_val, ensemble_cal = [], [], []
    for name in VARIANTS:
        model, spec = load_classifier(ws / "models" / name)
        test = load_split(ws / "split", "test", mode=spec.mode, size=spec.image_size)
        val = load_split(ws / "split", "val", mode=spec.mode, size=spec.image_size)
        cal = load_split(ws / "split", "calibration", mode=spec.mode, size=spec.image_size)
        assert len(cal) == len(val) == 10  # the split's 2 validation images per class, shared out
        def log_p(images: torch.Tensor) -> np.ndarray:
            out = predict_logits(model, images, batch_size=7, device=torch.device("cpu")).double()
            return torch.log_softmax(out, 1).numpy()

        # Test-time augmentation (evaluate.tta's default [hflip]): the mean of the probabilities of the
        # image and its mirror, served only where that wins on validation by an exact McNemar test.
        plain = {"val": log_p(val.images), "cal": log_p(cal.images), "test": log_p(test.images)}
        mirrored = {k: np.log((np.exp(plain[k]) + np.exp(log_p(torch.flip(x.images, [-1])))) / 2)
                    for k, x in (("val", val), ("cal", cal), ("test", test))}
        right = {k: {"plain": plain[k].argmax(1) == x.labels.numpy(), "tta": mirrored[k].argmax(1) == x.labels.numpy()}
                 for k, x in (("val", val), ("test", test))}
        b, c = int((right["val"]["tta"] & ~right["val"]["plain"]).sum()), int((~right["val"]["tta"] & right["val"]["plain"]).sum())
        p_val = 1.0 if b + c == 0 else binomtest(b, b + c, 0.5).pvalue
        used = b > c and p_val < 0.05
        assert metrics[name]["tta_used"] == float(used) and metrics[name]["tta_val_p"] == pytest.approx(p_val, rel=1e-5)
        assert metrics[name]["test_accuracy_tta"] == pytest.approx(right["test"]["tta"].mean(), abs=1e-6)
        chosen = mirrored if used else plain
        logits, val_logits, cal_logits = chosen["test"], chosen["val"], chosen["cal"]
        # The temperature minimises the NLL on the calibration split (which chose nothing, unlike
        # validation); the calibrated test NLL uses it.
        t = fit_temperature(log_probabilities(cal_logits), cal.labels.numpy())
        assert metrics[name]["temperature"] == pytest.approx(t, rel=1e-5)
        for other in (t * 1.01, t / 1.01, 1.0):  # the minimum within its range, checked without the search
            if T_MIN <= other <= T_MAX:
                objective = [fit_objective(log_probabilities(cal_logits), cal.labels.numpy(), x) for x in (t, other)]
                assert objective[0] <= objective[1]
        assert metrics[name]["test_loss_calibrated"] == pytest.approx(nll(logits, test.labels.numpy(), t), abs=1e-5)
        all_probs.append(scaled(logits, t))
        ensemble_val.append(scaled(val_logits, t))
        ensemble_cal.append(scaled(cal_logits, t))
        # The conformal threshold: the ceil((n + 1) * 0.9)-th smallest calibration score, a score being
        # the calibrated probability of the classes above the true one; the sets it gives on test.
        calibrated, cal_labels = ensemble_cal[-1], cal.labels.numpy()
        true = calibrated[np.arange(len(cal_labels)), cal_labels]
        above = np.where(calibrated >= true[:, None], calibrated, 0).sum(1) - true
        threshold = np.sort(above)[math.ceil(0.9 * (len(above) + 1)) - 1]
        assert metrics[name]["conformal_threshold"] == pytest.approx(threshold, abs=1e-6)
        test_probs, test_labels = all_probs[-1], test.labels.numpy()
        true = test_probs[np.arange(len(test_labels)), test_labels]
        above = np.where(test_probs > true[:, None], test_probs, 0).sum(1)
        assert metrics[name]["test_coverage"] == pytest.approx(np.mean(above <= threshold + 1e-12), abs=1e-6)
        expected = (logits.argmax(1) == test.labels.numpy()).mean()
        row = comparison.set_index("variant").loc[name]
        assert row["test_accuracy"] == pytest.approx(expected, abs=1e-6)
        assert row["ci_low"] <= row["test_accuracy"] <= row["ci_high"]
    # The ensemble (`members: all`): the mean of the members' calibrated probabilities, with a
    # temperature of its own; its validation accuracy is that mean's on the validation split.
    ensemble = (np.mean(all_probs, axis=0).argmax(1) == test.labels.numpy()).mean()
    assert comparison.set_index("variant").loc["ensemble", "test_accuracy"] == pytest.approx(ensemble, abs=1e-6)
    t = fit_temperature(np.log(np.mean(ensemble_cal, axis=0)), cal.labels.numpy())
    assert metrics["ensemble"]["temperature"] == pytest.approx(t, rel=1e-5)
    ensemble_val_accuracy = (np.mean(ensemble_val, axis=0).argmax(1) == val.labels.numpy()).mean()
    assert metrics["ensemble"]["val_accuracy"] == pytest.approx(ensemble_val_accuracy, abs=1e-6)
    assert list(comparison["val_accuracy"]) == pytest.approx([0.5, 0.7, 0.6, ensemble_val_accuracy])

    per_class = pd.read_csv(ws / "evaluation" / "per_class.csv")
    assert list(per_class.columns) == ["variant", "class", "precision", "recall", "f1", "support"]
    assert per_class.groupby("variant")["support"].sum().to_dict() == {v: 40 for v in [*VARIANTS, "ensemble"]}
    mc = pd.read_csv(ws / "evaluation" / "mcnemar.csv")
    pairs = list(zip(mc["variant_a"], mc["variant_b"]))
    assert pairs == [("scratch", "wide"), ("scratch", "big"), ("scratch", "ensemble"), ("wide", "big"),
                     ("wide", "ensemble"), ("big", "ensemble")]
    shown = (ws / "evaluation" / "comparison.md").read_text()
    assert "McNemar" in shown and "x its cheapest)" in shown  # the ensemble's cost beside its members
    assert (comparison.set_index("variant")["macs"]["ensemble"]
            == comparison.set_index("variant")["macs"][list(VARIANTS)].sum() > 0)

    plots = ws / "plots"
    for name in (*VARIANTS, "ensemble"):
        assert (plots / f"confusion_{name}.png").stat().st_size > 1000
        confusion = pd.read_csv(plots / "confusion" / f"{name}.csv")
        assert list(confusion.columns) == ["actual", "predicted"] and len(confusion) == 40
        reliability_bins = pd.read_csv(plots / "reliability" / f"{name}.csv")
        assert list(reliability_bins.columns) == ["confidence", "accuracy", "count"]
        assert reliability_bins["count"].sum() == 40
    for name in VARIANTS:
        assert (plots / f"misclassified_{name}.png").stat().st_size > 1000
    assert (plots / "accuracy.png").stat().st_size > 1000
    assert (plots / "reliability.png").stat().st_size > 1000
    assert not (ws / "evaluation" / "label_issues.csv").exists()  # no feature_extract variant: no label check

    keys = {"test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high", "test_loss", "test_macro_f1",
            "temperature", "test_loss_calibrated", "test_ece", "test_ece_calibrated", "conformal_threshold",
            "test_coverage", "test_coverage_ci_low", "test_coverage_ci_high", "test_set_size"}
    tta_keys = {"tta_used", "tta_val_p", "test_accuracy_tta", "test_accuracy_tta_ci_low", "test_accuracy_tta_ci_high",
                "tta_test_p"}
    assert all(set(metrics[v]) == keys | tta_keys for v in VARIANTS)
    assert set(metrics["ensemble"]) == keys | {"val_accuracy"}
    assert set(metrics["mcnemar"]) == {f"{a}_vs_{b}" for a, b in pairs}

    # The same metric names land in each variant's own training run, which stays FINISHED.
    client = mlflow.MlflowClient()
    for name in ("scratch", "wide"):
        run = client.get_run(json.loads((ws / "models" / name / "run.json").read_text())["run_id"])
        assert run.info.status == "FINISHED"
        logged = dict(run.data.metrics)
        assert logged.pop("inference_ms_per_image") > 0  # this machine's: in MLflow, not in the metrics file
        assert {k: float(f"{v:.6g}") if k.endswith("_p") else round(v, 6) for k, v in logged.items()} == metrics[name]
    summary = client.search_runs([client.get_experiment_by_name("evaltest").experiment_id],
                                 "tags.stage = 'evaluate'")
    assert len(summary) == 1 and summary[0].info.status == "FINISHED"
    assert set(summary[0].data.metrics) == {f"mcnemar_p.{pair}" for pair in metrics["mcnemar"]}
    # The ensemble has a run of its own, as a trained variant has its training run: what register
    # registers, with the validation accuracy it competes for champion with.
    record = json.loads((ws / "ensembles.json").read_text())["ensemble"]
    assert record["members"] == list(VARIANTS) and record["combine"] == "calibrated_mean"
    own = client.get_run(record["run_id"])
    assert (own.info.run_name, own.info.status, own.data.tags["kind"]) == ("ensemble", "FINISHED", "ensemble")
    assert own.data.params["members"] == "scratch,wide,big"
    assert own.data.metrics["val_accuracy"] == pytest.approx(record["val_accuracy"])
    assert record["val_accuracy"] == pytest.approx(ensemble_val_accuracy)
    assert own.data.metrics["test_accuracy"] == pytest.approx(metrics["ensemble"]["test_accuracy"])
    assert own.data.metrics["inference_ms_per_image"] > 0
    assert summary[0].data.tags["run_id.ensemble"] == record["run_id"]
    artifacts = {a.path for d in ("evaluation", "plots") for a in client.list_artifacts(summary[0].info.run_id, d)}
    assert {"evaluation/comparison.csv", "evaluation/comparison.md", "evaluation/mcnemar.csv",
            "evaluation/per_class.csv", "plots/accuracy.png", "plots/confusion_scratch.png"} <= artifacts

    # A re-run reproduces the DVC metrics and tables byte for byte.
    before = {p: (ws / p).read_bytes() for p in ("metrics/evaluate.json", "evaluation/comparison.csv",
                                                 "evaluation/mcnemar.csv", "plots/confusion/wide.csv")}
    _run_stage(ws, monkeypatch, caplog)
    assert {p: (ws / p).read_bytes() for p in before} == before


def test_an_ensemble_entry_is_added_and_removed_by_params_alone(workspace: Path, monkeypatch, caplog):
    """Without the entry: no ensemble row, metrics, plots, McNemar pair or run, and the variants' own
    results are those of a run with it. Another entry of two members with `mean` is a second
    ensemble of its own."""
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["variants"]["ensemble"] = {}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run_stage(workspace, monkeypatch, caplog)

    comparison = pd.read_csv(workspace / "evaluation" / "comparison.csv")
    assert list(comparison["variant"]) == list(VARIANTS)
    assert set(pd.read_csv(workspace / "evaluation" / "per_class.csv")["variant"]) == set(VARIANTS)
    mc = pd.read_csv(workspace / "evaluation" / "mcnemar.csv")
    assert list(zip(mc["variant_a"], mc["variant_b"])) == [("scratch", "wide"), ("scratch", "big"), ("wide", "big")]
    metrics = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    assert set(metrics) == {*VARIANTS, "mcnemar"}
    assert "| ensemble" not in (workspace / "evaluation" / "comparison.md").read_text()
    assert json.loads((workspace / "ensembles.json").read_text()) == {}
    plots = workspace / "plots"
    assert not (plots / "confusion_ensemble.png").exists() and not (plots / "confusion" / "ensemble.csv").exists()
    assert (plots / "confusion_scratch.png").exists()
    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name("evaltest").experiment_id
    assert not client.search_runs([experiment], "tags.kind = 'ensemble'")

    # Two entries: all three members' calibrated mean, and two members' plain mean.
    params["variants"]["ensemble"] = {"ensemble": {}, "pair": {"members": ["wide", "scratch"], "combine": "mean"}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run_stage(workspace, monkeypatch, caplog)
    with_ensembles = json.loads((workspace / "metrics" / "evaluate.json").read_text())
    assert {v: with_ensembles[v] for v in VARIANTS} == {v: metrics[v] for v in VARIANTS}
    assert list(pd.read_csv(workspace / "evaluation" / "comparison.csv")["variant"]) == [*VARIANTS, "ensemble", "pair"]
    records = json.loads((workspace / "ensembles.json").read_text())
    assert records["pair"]["members"] == ["wide", "scratch"] and records["pair"]["combine"] == "mean"
    assert len(client.search_runs([experiment], "tags.kind = 'ensemble'")) == 2
    # `mean`: the members' probabilities as trained (no temperatures), in the order listed.
    probs = []
    for name in ("wide", "scratch"):
        model, spec = load_classifier(workspace / "models" / name)
        test = load_split(workspace / "split", "test", mode=spec.mode, size=spec.image_size)
        cpu = torch.device("cpu")
        plain = torch.softmax(predict_logits(model, test.images, batch_size=7, device=cpu).double(), 1)
        mirrored = torch.softmax(predict_logits(model, torch.flip(test.images, [-1]), batch_size=7, device=cpu).double(), 1)
        probs.append(((plain + mirrored) / 2 if metrics[name]["tta_used"] else plain).numpy())
    expected = (np.mean(probs, axis=0).argmax(1) == test.labels.numpy()).mean()
    assert with_ensembles["pair"]["test_accuracy"] == pytest.approx(expected, abs=1e-6)


def test_a_missing_model_names_the_folder_and_the_stage_to_run(workspace: Path, monkeypatch, caplog):
    params = yaml.safe_load((workspace / "params.yaml").read_text())
    params["variants"]["scratch"] = {"scratch": {}, "lenet": {}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(FileNotFoundError, match=r"models/lenet: no model; run `dvc repro scratch@lenet`"):
        _run_stage(workspace, monkeypatch, caplog)
    params["variants"]["scratch"] = {"scratch": {}, "mcnemar": {}}
    (workspace / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(ValueError, match="variants.scratch.mcnemar: 'mcnemar' is reserved"):
        _run_stage(workspace, monkeypatch, caplog)
    assert not (workspace / "evaluation").exists()


def test_frozen_backbone_is_scored_from_its_own_cached_test_features(split_dir: Path, tmp_path: Path, caplog):
    """The feature_extract model's test logits come from the cache feature_extract wrote (no second
    backbone pass) and equal a full forward; a model whose backbone differs is run in full."""
    from cnnlab.stages.evaluate import EvaluatePaths, evaluate_variants
    from cnnlab.models.classifier import save_classifier
    from helpers.variant_runs import extract_features

    extract_features(split_dir, tmp_path / "fx")
    models, features = tmp_path / "models", tmp_path / "features"
    model, spec = load_classifier(tmp_path / "fx" / "model")
    save_classifier(model, spec, models / "feature_extract")
    with torch.no_grad():  # a "fine-tuned" copy: same architecture, one backbone weight changed
        model.net.features.conv_head.weight.mul_(1.01)
    save_classifier(model, spec, models / "tuned")
    for name in ("feature_extract", "tuned"):
        (models / name / "run.json").write_text(json.dumps({"val_accuracy": 0.5}))
    # data/features/<variant>: the tuned model gets the same cache, made by another backbone
    for name in ("feature_extract", "tuned"):
        shutil.copytree(tmp_path / "fx" / "features", features / name)

    cfg = EvaluateParams(batch_size=16, bootstrap_samples=100, confidence=0.95, misclassified=2)
    caplog.set_level(logging.INFO, logger="cnnlab")

    def run(features: Path) -> pd.DataFrame:
        caplog.clear()
        paths = EvaluatePaths(split_dir=split_dir, models_dir=models, features_dir=features, out_dir=tmp_path / "ev",
                              plots_dir=tmp_path / "pl", metrics_file=tmp_path / "ev.json")
        evaluate_variants({"feature_extract": "fx", "tuned": "ft"}, cfg, paths, seed=0, experiment="t")
        return pd.read_csv(tmp_path / "ev" / "comparison.csv").set_index("variant")

    def logged() -> str:
        return "\n".join(r.getMessage() for r in caplog.records)

    cached = run(features)
    assert "feature_extract: test features from" in logged() and "tuned: test features" not in logged()
    assert "feature_extract: val features from" in logged() and "tuned: val features" not in logged()
    # The label check used feature_extract's cached train + val features (tuned's are another backbone's).
    assert "feature_extract's features" in logged()
    issues = pd.read_csv(tmp_path / "ev" / "label_issues.csv")
    assert list(issues.columns) == ["split", "key", "source", "given", "suggested", "p_given", "p_suggested",
                                    "label_quality"]
    assert set(issues["split"]) <= {"train", "val"} and (issues["given"] != issues["suggested"]).all()
    assert (tmp_path / "pl" / "label_issues.png").stat().st_size > 1000
    checked = json.loads((tmp_path / "ev.json").read_text())["label_issues"]
    assert checked["checked"] == sum(len(read_manifest(split_dir, split)) for split in ("train", "val"))
    assert checked["suspects"] == len(issues)
    full = run(tmp_path / "no-features")  # no cache for any variant: every model runs in full
    assert "test features from" not in logged()
    pd.testing.assert_frame_equal(cached, full, atol=1e-5, rtol=0)
