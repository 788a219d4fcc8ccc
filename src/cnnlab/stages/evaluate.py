"""Stage `evaluate`: every declared variant on the test split, with what makes its answers
trustworthy: a temperature and a prediction-set threshold fitted on the validation split, test-time
views where they win there, Grad-CAM on its worst mistakes; then their ensemble, McNemar tests,
the label check, the comparison tables and figures, and the MLflow records. The methods live in
`cnnlab.evaluation` (scoring, calibration, conformal, tta, explain, label_check), the models'
loading in `cnnlab.evaluation.trained`, the label check's files in `cnnlab.evaluation.label_report`; this
module wires them to files and runs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cnnlab.config import ConfigError, EvaluateParams
from cnnlab.data.tensors import TensorSet, load_split, split_classes
from cnnlab.evaluation.calibration import (
    at_bound,
    fit_temperature,
    log_probabilities,
    reliability,
    scaled,
)
from cnnlab.evaluation.conformal import conformal_threshold, conformity_scores
from cnnlab.evaluation.explain import grad_cam
from cnnlab.evaluation.figures import (
    plot_accuracy,
    plot_confusion,
    plot_misclassified,
    plot_reliability,
)
from cnnlab.evaluation.label_report import (
    LABEL_ISSUES,
    check_labels,
    write_label_issues,
)
from cnnlab.evaluation.scoring import (
    ENSEMBLE,
    TtaReport,
    VariantResult,
    best_by_validation,
    bootstrap_interval,
    comparison_markdown,
    comparison_table,
    ensemble_probabilities,
    mcnemar,
    mcnemar_markdown,
    mcnemar_pairs,
    mcnemar_table,
    score,
)
from cnnlab.evaluation.trained import Trained, cached_logits, load_variant
from cnnlab.evaluation.tta import VIEWS, choose, mean_log_probabilities
from cnnlab.models.classifier import Classifier
from cnnlab.tracking.runs import tracked_run, tracking_uri
from cnnlab.training.engine import predict_logits
from cnnlab.training.features import FeatureCache
from cnnlab.training.hardware import Runtime, resolve_runtime
from cnnlab.utils.files import atomic_write_text, staged_dir, write_json
from cnnlab.utils.progress import progress

_log = logging.getLogger(__name__)


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
    loaded = [load_variant(name, models_dir, classes, stages[name]) for name in variants]

    results, labels, images, fitted = _score_variants(loaded, split_dir, classes, cfg, seed=seed, rt=rt,
                                                      features_dir=paths.features_dir)
    suspects = check_labels(loaded, split_dir, classes, seed=seed, features_dir=paths.features_dir) \
        if cfg.label_issues else None
    members = list(results)
    if cfg.ensemble and len(members) > 1:  # an ensemble of one would only repeat its member
        results.append(_ensemble(members, fitted, labels, classes, cfg, seed=seed))
    for r in results:
        if r.coverage_ci[1] < cfg.coverage:  # the guarantee needs validation and test alike
            _log.warning("%s: its prediction sets hold the true class for %.1f%% of the test images (%g%% interval "
                         "up to %.1f%%), below evaluate.coverage %g%%: the validation split is not like the test "
                         "split (or too small)", r.name, 100 * r.covered.mean(), 100 * cfg.confidence,
                         100 * r.coverage_ci[1], 100 * cfg.coverage)
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
                     confidence=cfg.confidence, models={v.name: v.model for v in loaded})
        if suspects is not None:
            write_label_issues(suspects, out, plots, show=cfg.label_issues)
        # Inside the staged block: if MLflow fails, the previous outputs stay as they were.
        _log_variant_runs(run_ids, {r.name: r for r in members}, models_dir)
        _log_summary_run(experiment, {"seed": seed, "evaluate": cfg.model_dump()}, results, mcnemar, out, plots,
                         run_ids, rt.tags())
    metrics = _dvc_metrics(results, mcnemar)
    if suspects is not None:
        metrics[LABEL_ISSUES] = {"checked": suspects.issues.checked, "suspects": len(suspects.issues.indices)}
    write_json(paths.metrics_file, metrics)
    return markdown + f"\nMcNemar, exact (b: only A right, c: only B right):\n{mcnemar_markdown(mcnemar)}"


def _check_names(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variants: {', '.join(duplicates)} is listed more than once")
    reserved = sorted({ENSEMBLE, "mcnemar", LABEL_ISSUES} & set(names))  # keys of their own in the metrics file
    if reserved:
        raise ConfigError(f"variants: {', '.join(map(repr, reserved))} is a reserved name (the "
                          "ensemble's / the McNemar tests' / the label check's key in the metrics file); "
                          "rename that variant")


def _score_variants(variants: list[Trained], split_dir: Path, classes: list[str], cfg: EvaluateParams, *,
                    seed: int, rt: Runtime, features_dir: Path | None,
                    ) -> tuple[list[VariantResult], np.ndarray, dict[str, np.ndarray], dict[str, Calibrated]]:
    """Each variant's test predictions scored after fitting its temperature on validation (with
    its test-time views where they win on validation); also the test labels, the images each
    model saw, and each model's validation scores (for the ensemble)."""
    sets: dict[tuple[str, str, int], TensorSet] = {}  # decoded once per split, input mode and size, shared
    results, images, fitted = [], {}, {}
    for v in variants:
        cache = FeatureCache(features_dir / v.name) if features_dir and (features_dir / v.name).is_dir() else None
        plain, viewed, form = {}, {}, (v.spec.mode, v.spec.image_size)
        for split in ("val", "test"):
            key = (split, *form)
            if key not in sets:
                sets[key] = load_split(split_dir, split, mode=v.spec.mode, size=v.spec.image_size)
            logits = cached_logits(v, split_dir, split, sets[key], cache, rt=rt)
            if logits is None:
                logits = _predict(v.model, sets[key].images, batch_size=cfg.batch_size, rt=rt,
                                  desc=f"{split} {v.name}")
            plain[split] = log_probabilities(logits.numpy())
            if cfg.tta:
                extra = [log_probabilities(_predict(v.model, VIEWS[name](sets[key].images), batch_size=cfg.batch_size,
                                                    rt=rt, desc=f"{split} {v.name} {name}").numpy())
                         for name in cfg.tta]
                viewed[split] = mean_log_probabilities([plain[split], *extra])
        val, test = sets[("val", *form)], sets[("test", *form)]
        val_labels, test_labels = val.labels.numpy(), test.labels.numpy()
        choice = choose(cfg.tta, plain["val"].argmax(1) == val_labels,
                        viewed["val"].argmax(1) == val_labels) if cfg.tta else None
        scores = viewed if choice is not None and choice.used else plain
        fitted[v.name] = Calibrated(scores["val"], val_labels, _fit(v.name, scores["val"], val_labels))
        result = score(v.name, np.exp(scores["test"]), test_labels, classes=classes,
                       bootstrap_samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed,
                       val_accuracy=v.val_accuracy, parameters=_parameters(v.model),
                       temperature=fitted[v.name].temperature, conformal_threshold=fitted[v.name].threshold(cfg.coverage))
        if choice is not None:
            with_views, without = viewed["test"].argmax(1) == test_labels, plain["test"].argmax(1) == test_labels
            result = dataclasses.replace(result, tta=TtaReport(
                choice.used, choice.val_p, float(with_views.mean()),
                bootstrap_interval(with_views, samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed),
                mcnemar(with_views, without).p_value))
        results.append(result)
        images[v.name] = test.images.numpy()
    test_labels = next(s for k, s in sets.items() if k[0] == "test").labels.numpy()
    return results, test_labels, images, fitted


@dataclass(frozen=True)
class Calibrated:
    """A model's validation log-probabilities, their labels, and the temperature fitted on them."""

    val_scores: np.ndarray
    val_labels: np.ndarray
    temperature: float

    def val_probabilities(self) -> np.ndarray:
        return scaled(self.val_scores, self.temperature)

    def threshold(self, coverage: float) -> float:
        """The conformal threshold of the calibrated validation probabilities (the same images
        fit T: one parameter, so its effect on the coverage is small; the test coverage says)."""
        return conformal_threshold(conformity_scores(self.val_probabilities(), self.val_labels), coverage)


def _ensemble(members: list[VariantResult], fitted: dict[str, Calibrated], labels: np.ndarray, classes: list[str],
              cfg: EvaluateParams, *, seed: int) -> VariantResult:
    """The mean of the members' calibrated probabilities, itself calibrated on validation (a mean of
    calibrated models is usually under-confident: T < 1 sharpens it)."""
    val_probs = ensemble_probabilities([fitted[r.name].val_probabilities() for r in members])
    val_labels = fitted[members[0].name].val_labels
    val_scores = np.log(np.clip(val_probs, 1e-300, 1.0))
    mine = Calibrated(val_scores, val_labels, _fit(ENSEMBLE, val_scores, val_labels))
    return score(ENSEMBLE, ensemble_probabilities([r.calibrated for r in members]), labels, classes=classes,
                 bootstrap_samples=cfg.bootstrap_samples, confidence=cfg.confidence, seed=seed,
                 val_accuracy=None, parameters=sum(r.parameters for r in members), temperature=mine.temperature,
                 conformal_threshold=mine.threshold(cfg.coverage))


def _fit(name: str, val_scores: np.ndarray, val_labels: np.ndarray) -> float:
    temperature = fit_temperature(val_scores, val_labels)
    if at_bound(temperature):
        _log.warning("%s: the temperature fitted on validation is at its bound (%.3g): the validation split is "
                     "too small or the model gets all of it right, so its calibration means little", name,
                     temperature)
    return temperature


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
             "variants' calibrated probabilities. T: the temperature fitted on the validation split by NLL, "
             "which the served model applies (it leaves every prediction, so accuracy and McNemar, as "
             "they are); test NLL and ECE (15 equal-width bins) before -> after it.\n\nMcNemar, exact: b = images only A classifies right, c = only B; "
             "p_holm corrects for testing every pair.\n\n")
    atomic_write_text(out / "comparison.md", markdown + notes + mcnemar_markdown(mcnemar))


def _write_plots(plots: Path, results: list[VariantResult], images: dict[str, np.ndarray], labels: np.ndarray,
                 classes: list[str], *, misclassified: int, confidence: float,
                 models: dict[str, Classifier]) -> None:
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
            # Where the net looked for the class it wrongly chose.
            heat = grad_cam(models[r.name], torch.from_numpy(images[r.name][worst]), r.predicted[worst])
            plot_misclassified(images[r.name][worst], names[labels[worst]], names[r.predicted[worst]],
                               r.calibrated[worst, r.predicted[worst]], plots / f"misclassified_{r.name}.png",
                               title=f"{r.name}: most confident mistakes ({len(worst)} of {int((~r.correct).sum())}), "
                                     "calibrated confidence; Grad-CAM of the predicted class", heat=heat)
    # DVC's linear template draws one line per file: the served (calibrated) confidence per bin.
    panels = []
    for r in results:
        before, after = reliability(r.probs, labels), reliability(r.calibrated, labels)
        panels.append((r.name, r.temperature, before, after))
        atomic_write_text(plots / "reliability" / f"{r.name}.csv",
                          after[["confidence", "accuracy", "count"]].to_csv(index=False, lineterminator="\n",
                                                                          float_format="%.6g"))
    plot_reliability(panels, plots / "reliability.png")


def _most_confident_mistakes(r: VariantResult, limit: int) -> np.ndarray:
    """Indices of wrong predictions, surest first (ties in test order): the most telling errors."""
    wrong = np.flatnonzero(~r.correct)
    confidence = r.calibrated[wrong, r.predicted[wrong]]
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
        for name in ("comparison.csv", "comparison.md", "mcnemar.csv", "per_class.csv", "label_issues.csv"):
            if not (out / name).exists():  # label_issues.csv: only with a feature_extract variant
                continue
            mlflow.log_artifact(str(out / name), "evaluation")
        for png in sorted(plots.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")


def _dvc_metrics(results: list[VariantResult], mcnemar: pd.DataFrame) -> dict:
    """Only what the models and params determine, rounded, so a re-run writes the same bytes."""
    # p-values (keys ending in _p) to 6 significant digits, not decimals: a strong difference has p << 1e-6.
    metrics: dict = {r.name: {k: float(f"{v:.6g}") if k.endswith("_p") else round(v, 6) for k, v in r.metrics().items()}
                     for r in results}
    metrics["mcnemar"] = {f"{a}_vs_{b}": float(f"{p:.6g}") for a, b, p in
                          zip(mcnemar["variant_a"], mcnemar["variant_b"], mcnemar["p_value"])}
    return metrics
