"""Stage `evaluate`: every declared variant on the test split, their ensemble, McNemar tests,
the comparison tables and figures, and the MLflow records. The statistics live in
`cnnlab.evaluation.scoring`, the figures in `cnnlab.evaluation.figures`; this module wires them to files and runs.
"""

from __future__ import annotations

import logging
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnnlab.config import ConfigError, EvaluateParams
from cnnlab.data.tensors import TensorSet, load_split, split_classes
from cnnlab.evaluation.figures import plot_accuracy, plot_confusion, plot_misclassified
from cnnlab.evaluation.scoring import (
    ENSEMBLE,
    VariantResult,
    best_by_validation,
    comparison_markdown,
    comparison_table,
    ensemble_probabilities,
    mcnemar_markdown,
    mcnemar_pairs,
    mcnemar_table,
    score,
    softmax,
)
from cnnlab.utils.files import atomic_write_text, staged_dir, write_json
from cnnlab.models.classifier import Classifier, ModelSpec, load_classifier
from cnnlab.utils.progress import progress
from cnnlab.tracking.runs import tracked_run, tracking_uri
from cnnlab.training.engine import predict_logits
from cnnlab.training.features import FeatureCache, manifest_digest, trunk_digest
from cnnlab.training.hardware import Runtime, resolve_runtime

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trained:
    """A variant's trained model as its stage left it in data/models/<name>/."""

    name: str
    model: Classifier
    spec: ModelSpec
    run_id: str | None  # the training run, from run.json
    val_accuracy: float


@dataclass(frozen=True)
class EvaluatePaths:
    """What evaluate reads and writes (from the dvc.yaml command line)."""

    split_dir: Path
    models_dir: Path  # <variant>/{spec.json, weights.pt, run.json}
    features_dir: Path  # a frozen-backbone variant's cached test features, if it has any
    out_dir: Path  # the tables
    plots_dir: Path
    metrics_file: Path  # DVC metrics


def evaluate_variants(stages: dict[str, str], cfg: EvaluateParams, paths: EvaluatePaths, *, seed: int,
                      experiment: str) -> str:
    """Evaluate ``models_dir/<variant>`` for each variant in ``stages`` (variant -> the DVC stage
    that trains it, for error messages) and write every output; returns the comparison and McNemar
    tables as Markdown. A frozen-backbone variant is scored from the test features in
    ``features_dir/<variant>`` when they were made by exactly its backbone (see
    `cnnlab.training.features`)."""
    variants = list(stages)
    split_dir, models_dir = paths.split_dir, paths.models_dir
    _check_names(variants)
    # fp32 with TF32 off on any device: the reported numbers are the model's, not the hardware's.
    rt = resolve_runtime(device=cfg.device, precision="fp32", channels_last=True, tf32=False)
    _log.info("evaluate: %s", rt.describe())
    if not (split_dir / "test.csv").exists():
        raise FileNotFoundError(f"{split_dir / 'test.csv'}: no test split; run `dvc repro split`")
    classes = split_classes(split_dir)
    loaded = [_load_variant(name, models_dir, classes, stages[name]) for name in variants]

    results, labels, images = _score_variants(loaded, split_dir, classes, cfg, seed=seed, rt=rt,
                                              features_dir=paths.features_dir)
    members = list(results)
    if cfg.ensemble and len(members) > 1:  # an ensemble of one would only repeat its member
        results.append(score(ENSEMBLE, ensemble_probabilities([r.probs for r in members]), labels, classes=classes,
                             bootstrap_samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed,
                             val_accuracy=None, parameters=sum(r.parameters for r in members)))
    has_ensemble = results[-1].name == ENSEMBLE
    pairs = mcnemar_pairs([r.name for r in members], ENSEMBLE if has_ensemble else None,
                          best_by_validation(members).name if has_ensemble else None)

    comparison = comparison_table(results)
    markdown = comparison_markdown(comparison, cfg.confidence)
    mcnemar = mcnemar_table(results, pairs)
    run_ids = {v.name: v.run_id for v in loaded}
    with staged_dir(paths.out_dir) as out, staged_dir(paths.plots_dir) as plots:
        _write_tables(out, comparison, markdown, mcnemar, results, cfg.confidence)
        _write_plots(plots, results, images, labels, classes, misclassified=cfg.misclassified,
                     confidence=cfg.confidence)
        # Inside the staged block: if MLflow fails, the previous outputs stay as they were.
        _log_variant_runs(run_ids, {r.name: r for r in members}, models_dir)
        _log_summary_run(experiment, {"seed": seed, "evaluate": cfg.model_dump()}, results, mcnemar, out, plots,
                         run_ids, rt.tags())
    write_json(paths.metrics_file, _dvc_metrics(results, mcnemar))
    return markdown + f"\nMcNemar, exact (b: only A right, c: only B right):\n{mcnemar_markdown(mcnemar)}"


def _check_names(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variants: {', '.join(duplicates)} is listed more than once")
    reserved = sorted({ENSEMBLE, "mcnemar"} & set(names))  # keys of their own in the metrics file
    if reserved:
        raise ConfigError(f"variants: {', '.join(map(repr, reserved))} is a reserved name (the "
                          "ensemble's / the McNemar tests' key in the metrics file); rename that variant")


def _load_variant(name: str, models: Path, classes: list[str], stage: str) -> Trained:
    folder = models / name
    if not (folder / "spec.json").exists() or not (folder / "weights.pt").exists():
        raise FileNotFoundError(f"{folder}: no model; run `dvc repro {stage}`")
    model, spec = load_classifier(folder)
    if list(spec.classes) != classes:
        raise ValueError(f"{folder / 'spec.json'}: its classes differ from the split's classes.json; the model "
                         f"is out of date, run `dvc repro {stage}`")
    run_file = folder / "run.json"
    try:
        run = json.loads(run_file.read_text(encoding="utf-8"))
        val_accuracy = float(run["val_accuracy"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{run_file}: not found; run `dvc repro {stage}`") from None
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{run_file}: no numeric val_accuracy; run `dvc repro {stage}`") from None
    return Trained(name=name, model=model, spec=spec, run_id=run.get("run_id"), val_accuracy=val_accuracy)


def _score_variants(variants: list[Trained], split_dir: Path, classes: list[str], cfg: EvaluateParams, *,
                    seed: int, rt: Runtime, features_dir: Path | None,
                    ) -> tuple[list[VariantResult], np.ndarray, dict[str, np.ndarray]]:
    """Each variant's test predictions scored; also the labels and the images each model saw."""
    tests: dict[tuple[str, int], TensorSet] = {}  # decoded once per input mode and size, shared
    results, images = [], {}
    for v in variants:
        key = (v.spec.mode, v.spec.image_size)
        if key not in tests:
            tests[key] = load_split(split_dir, "test", mode=v.spec.mode, size=v.spec.image_size)
        cache = FeatureCache(features_dir / v.name) if features_dir and (features_dir / v.name).is_dir() else None
        logits = _cached_logits(v, split_dir, tests[key], cache, rt=rt)
        if logits is None:
            logits = _predict(v.model, tests[key].images, batch_size=cfg.batch_size, rt=rt, desc=f"test {v.name}")
        results.append(score(v.name, softmax(logits.numpy()), tests[key].labels.numpy(), classes=classes,
                             bootstrap_samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed,
                             val_accuracy=v.val_accuracy, parameters=_parameters(v.model)))
        images[v.name] = tests[key].images.numpy()
    return results, next(iter(tests.values())).labels.numpy(), images


def _cached_logits(v: Trained, split_dir: Path, test: TensorSet, cache: FeatureCache | None, *,
                   rt: Runtime) -> torch.Tensor | None:
    """A frozen-backbone model's test logits from the feature cache: its head on the fp32 test
    features that feature_extract computed with this very backbone. None when there are none."""
    if cache is None or v.spec.kind != "pretrained":
        return None
    record = {"trunk": trunk_digest(v.model, arch=v.spec.arch, mode=v.spec.mode, image_size=v.spec.image_size),
              "manifest": manifest_digest(split_dir / "test.csv"), "precision": "fp32"}
    hit = cache.load("test", record)
    if hit is None or not torch.equal(hit[1], test.labels):
        return None
    _log.info("%s: test features from %s (its backbone's own, computed once)", v.name, cache.folder)
    return predict_logits(v.model.net.head.to(rt.device), hit[0], batch_size=4096, device=rt.device)


def _parameters(model: torch.nn.Module) -> int:
    return sum(t.numel() for t in model.parameters())


def _predict(model: Classifier, images: torch.Tensor, *, batch_size: int, rt: Runtime, desc: str) -> torch.Tensor:
    """fp32 logits on the CPU, one progress step per batch."""
    # channels_last keeps fp32's numbers on every re-run and is the layout oneDNN's convolutions
    # run fastest in (docs/benchmarks.md).
    model.to(rt.device).to(memory_format=torch.channels_last)
    starts = range(0, len(images), batch_size)
    return torch.cat([predict_logits(model, images[s:s + batch_size], batch_size=batch_size, device=rt.device,
                                     channels_last=True)
                      for s in progress(starts, desc=desc, total=len(starts), unit="batch")])


def _write_tables(out: Path, comparison: pd.DataFrame, markdown: str, mcnemar: pd.DataFrame,
                  results: list[VariantResult], confidence: float) -> None:
    def csv(df: pd.DataFrame, name: str) -> None:
        # 6 significant digits: a re-run writes the same bytes, and tiny p-values keep their value.
        atomic_write_text(out / name, df.to_csv(index=False, lineterminator="\n", float_format="%.6g"))

    csv(comparison, "comparison.csv")
    csv(mcnemar, "mcnemar.csv")
    csv(pd.concat([r.per_class.assign(variant=r.name) for r in results], ignore_index=True)
        [["variant", "class", "precision", "recall", "f1", "support"]], "per_class.csv")
    notes = (f"\nTest split, {len(results[0].correct)} images. CI: percentile bootstrap, {confidence * 100:g}%. "
             "Validation accuracy is what chose each model (from training); the ensemble averages the "
             "variants' probabilities.\n\nMcNemar, exact: b = images only A classifies right, c = only B; "
             "p_holm corrects for testing every pair.\n\n")
    atomic_write_text(out / "comparison.md", markdown + notes + mcnemar_markdown(mcnemar))


def _write_plots(plots: Path, results: list[VariantResult], images: dict[str, np.ndarray], labels: np.ndarray,
                 classes: list[str], *, misclassified: int, confidence: float) -> None:
    plot_accuracy([r.name for r in results], [r.test_accuracy for r in results], [r.ci_low for r in results],
                  [r.ci_high for r in results], [r.val_accuracy for r in results], plots / "accuracy.png",
                  confidence=confidence)
    names = np.asarray(classes, dtype=object)
    for r in results:
        title = f"{r.name}: test accuracy {r.test_accuracy:.2%}"
        plot_confusion(r.confusion, classes, plots / f"confusion_{r.name}.png", title=title)
        # DVC's confusion template counts (actual, predicted) rows itself.
        pairs = pd.DataFrame({"actual": names[labels], "predicted": names[r.predicted]})
        atomic_write_text(plots / "confusion" / f"{r.name}.csv", pairs.to_csv(index=False, lineterminator="\n"))
        if r.name in images:  # the ensemble has no single input size to show its mistakes at
            worst = _most_confident_mistakes(r, misclassified)
            plot_misclassified(images[r.name][worst], names[labels[worst]], names[r.predicted[worst]],
                               r.probs[worst, r.predicted[worst]], plots / f"misclassified_{r.name}.png",
                               title=f"{r.name}: most confident mistakes ({len(worst)} of {int((~r.correct).sum())})")


def _most_confident_mistakes(r: VariantResult, limit: int) -> np.ndarray:
    """Indices of wrong predictions, surest first (ties in test order): the most telling errors."""
    wrong = np.flatnonzero(~r.correct)
    confidence = r.probs[wrong, r.predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def _log_variant_runs(run_ids: dict[str, str | None], results: dict[str, VariantResult], models: Path) -> None:
    """Add the test metrics to each variant's own training run (its status is left as it is)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri())
    now = int(time.time() * 1000)
    for name, run_id in run_ids.items():
        where = models / name / "run.json"
        if run_id is None:
            _log.warning(f"{where}: missing or without run_id; {name}'s test metrics are not logged to MLflow")
            continue
        try:
            stage = client.get_run(run_id).info.lifecycle_stage
        except MlflowException:
            stage = None
        if stage != "active":
            _log.warning(f"{where}: run {run_id} is not in the MLflow store {tracking_uri()} (or is deleted); "
                  f"{name}'s test metrics are not logged to it (set MLFLOW_TRACKING_URI to the store it "
                  "was trained with)")
            continue
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in results[name].metrics().items()])


def _log_summary_run(experiment: str, logged_params: dict, results: list[VariantResult], mcnemar: pd.DataFrame,
                     out: Path, plots: Path, run_ids: dict[str, str | None], runtime_tags: dict[str, str]) -> None:
    """One run for the comparison: the ensemble's metrics, the p-values, the tables and figures.
    The tags point at the training runs that were evaluated."""
    import mlflow

    tags = {"stage": "evaluate", **runtime_tags, **{f"run_id.{k}": v for k, v in run_ids.items() if v}}
    with tracked_run(experiment=experiment, run_name="evaluate", tags=tags, params=logged_params):
        ensemble = [r for r in results if r.name == ENSEMBLE]
        if ensemble:
            mlflow.log_metrics(ensemble[0].metrics())
        mlflow.log_metrics({f"mcnemar_p.{a}_vs_{b}": p for a, b, p in
                            zip(mcnemar["variant_a"], mcnemar["variant_b"], mcnemar["p_value"])})
        for name in ("comparison.csv", "comparison.md", "mcnemar.csv", "per_class.csv"):
            mlflow.log_artifact(str(out / name), "evaluation")
        for png in sorted(plots.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")


def _dvc_metrics(results: list[VariantResult], mcnemar: pd.DataFrame) -> dict:
    """Only what the models and params determine, rounded, so a re-run writes the same bytes."""
    metrics: dict = {r.name: {k: round(v, 6) for k, v in r.metrics().items()} for r in results}
    # p-values to 6 significant digits, not decimals: a strong difference has p << 1e-6.
    metrics["mcnemar"] = {f"{a}_vs_{b}": float(f"{p:.6g}") for a, b, p in
                          zip(mcnemar["variant_a"], mcnemar["variant_b"], mcnemar["p_value"])}
    return metrics
