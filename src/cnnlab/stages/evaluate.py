"""Stage `evaluate`: every declared variant on the test split, with what makes its answers
trustworthy: a temperature and a prediction-set threshold fitted on the validation split, test-time
views where they win there, Grad-CAM on its worst mistakes; then each ensemble from its members'
answers (with an MLflow run of its own), McNemar tests, the label check, the comparison tables and
figures, and the MLflow records. The methods live in
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

from cnnlab.config import ConfigError, EnsembleParams, EvaluateParams
from cnnlab.data.shards import read_manifest
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
    TtaReport,
    VariantResult,
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
    # Each ensemble's MLflow run and validation accuracy, for `register`: beside the evaluation
    # folder, not in it, because a run id is new on every run while that folder is byte-reproducible.
    ensembles_file: Path | None = None


def evaluate_variants(stages: dict[str, str], cfg: EvaluateParams, paths: EvaluatePaths, *, seed: int,
                      experiment: str, ensembles: dict[str, EnsembleParams] | None = None) -> str:
    """Evaluate ``models_dir/<variant>`` for each variant in ``stages`` (variant -> the DVC stage
    that trains it, for error messages), then each of ``ensembles`` (name -> its settings, members
    listed) from its members' answers, and write every output; returns the comparison and McNemar
    tables as Markdown. A frozen-backbone variant is scored from the test features in
    ``features_dir/<variant>`` when they were made by exactly its backbone (see
    `cnnlab.training.features`). Each ensemble gets an MLflow run of its own, recorded with its
    validation accuracy in ``paths.ensembles_file`` (what `register` reads)."""
    variants, ensembles = list(stages), dict(ensembles or {})
    split_dir, models_dir = paths.split_dir, paths.models_dir
    _check_names([*variants, *ensembles])
    # fp32 with TF32 off on any device: the reported numbers are the model's, not the hardware's.
    rt = resolve_runtime(device=cfg.device, precision="fp32", channels_last=True, tf32=False)
    _log.info("evaluate: %s", rt.describe())
    if not (split_dir / "test.csv").exists():
        raise FileNotFoundError(f"{split_dir / 'test.csv'}: no test split; run `dvc repro split`")
    classes = split_classes(split_dir)
    loaded = [load_variant(name, models_dir, classes, stages[name]) for name in variants]

    results, labels, images, fitted, timing = _score_variants(loaded, split_dir, classes, cfg, seed=seed, rt=rt,
                                                              features_dir=paths.features_dir)
    suspects = check_labels(loaded, split_dir, classes, seed=seed, features_dir=paths.features_dir) \
        if cfg.label_issues else None
    members = {r.name: r for r in results}
    for name, settings in ensembles.items():
        results.append(_ensemble(name, settings, members, fitted, labels, classes, cfg, seed=seed))
        timing[name] = sum(timing[m] for m in settings.members)  # one process runs them one after another
    for r in results:
        if r.coverage_ci[1] < cfg.coverage:  # the guarantee needs validation and test alike
            _log.warning("%s: its prediction sets hold the true class for %.1f%% of the test images (%g%% interval "
                         "up to %.1f%%), below evaluate.coverage %g%%: the calibration split is not like the test "
                         "split (or too small)", r.name, 100 * r.covered.mean(), 100 * cfg.confidence,
                         100 * r.coverage_ci[1], 100 * cfg.coverage)
    pairs = mcnemar_pairs([r.name for r in results], None, None)

    comparison = comparison_table(results)
    markdown = comparison_markdown(comparison, cfg.confidence, _relative_cost(results, ensembles))
    mcnemar = mcnemar_table(results, pairs)
    run_ids = {v.name: v.run_id for v in loaded}
    with staged_dir(paths.out_dir) as out, staged_dir(paths.plots_dir) as plots:
        _write_tables(out, comparison, markdown, mcnemar, results, cfg.confidence)
        _write_plots(plots, results, images, labels, classes, misclassified=cfg.misclassified,
                     confidence=cfg.confidence, models={v.name: v.model for v in loaded})
        if suspects is not None:
            write_label_issues(suspects, out, plots, show=cfg.label_issues)
        # Inside the staged block: if MLflow fails, the previous outputs stay as they were.
        by_name = {r.name: r for r in results}
        _log_variant_runs(run_ids, {n: by_name[n] for n in variants}, models_dir, timing)
        ensemble_runs = _log_ensemble_runs(experiment, seed, {n: (s, by_name[n]) for n, s in ensembles.items()},
                                           run_ids, timing, rt.tags())
        if paths.ensembles_file is not None:
            write_json(paths.ensembles_file, ensemble_runs)
        _log_summary_run(experiment, {"seed": seed, "evaluate": cfg.model_dump()}, mcnemar, out, plots,
                         {**run_ids, **{n: e["run_id"] for n, e in ensemble_runs.items()}}, rt.tags())
    metrics = _dvc_metrics(results, mcnemar, variants)
    if suspects is not None:
        metrics[LABEL_ISSUES] = {"checked": suspects.issues.checked, "suspects": len(suspects.issues.indices)}
    write_json(paths.metrics_file, metrics)
    return (markdown + f"\nMcNemar, exact (b: only A right, c: only B right):\n{mcnemar_markdown(mcnemar)}"
            + f"\n{_relative_time(timing, ensembles, cfg.batch_size)}\n")


def _check_names(names: list[str]) -> None:
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"variants: {', '.join(duplicates)} is listed more than once")
    reserved = sorted({"mcnemar", LABEL_ISSUES} & set(names))  # keys of their own in the metrics file
    if reserved:
        raise ConfigError(f"variants: {', '.join(map(repr, reserved))} is a reserved name (the McNemar "
                          "tests' / the label check's key in the metrics file); rename that variant")


def _score_variants(variants: list[Trained], split_dir: Path, classes: list[str], cfg: EvaluateParams, *,
                    seed: int, rt: Runtime, features_dir: Path | None,
                    ) -> tuple[list[VariantResult], np.ndarray, dict[str, np.ndarray], dict[str, Calibrated],
                               dict[str, float]]:
    """Each variant's test predictions scored after fitting its temperature and prediction-set
    threshold on the calibration split (with its test-time views where they win on validation);
    also the test labels, the images each model saw, each model's validation and calibration
    scores (for the ensembles) and its time per image as served."""
    sets: dict[tuple[str, str, int], TensorSet] = {}  # decoded once per split, input mode and size, shared
    results, images, fitted, timing = [], {}, {}, {}
    calibration = _calibration_split(split_dir)
    for v in variants:
        cache = FeatureCache(features_dir / v.name) if features_dir and (features_dir / v.name).is_dir() else None
        plain, viewed, form = {}, {}, (v.spec.mode, v.spec.image_size)
        for split in dict.fromkeys(("val", calibration, "test")):
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
        val, cal, test = sets[("val", *form)], sets[(calibration, *form)], sets[("test", *form)]
        val_labels, cal_labels, test_labels = val.labels.numpy(), cal.labels.numpy(), test.labels.numpy()
        choice = choose(cfg.tta, plain["val"].argmax(1) == val_labels,
                        viewed["val"].argmax(1) == val_labels) if cfg.tta else None
        scores = viewed if choice is not None and choice.used else plain
        fitted[v.name] = Calibrated(scores["val"], val_labels, scores[calibration], cal_labels,
                                    _fit(v.name, scores[calibration], cal_labels))
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
        passes = 1 + (len(cfg.tta) if choice is not None and choice.used else 0)  # as served
        timing[v.name] = _seconds_per_image(v.model, test.images[:cfg.batch_size], rt, passes=passes)
        results.append(dataclasses.replace(result, macs=passes * _macs(v.model, test.images[:1].to(rt.device))))
        images[v.name] = test.images.numpy()
    test_labels = next(s for k, s in sets.items() if k[0] == "test").labels.numpy()
    return results, test_labels, images, fitted, timing


def _calibration_split(split_dir: Path) -> str:
    """"calibration" when the split has images there, else "val" (a split made with
    calibration_fraction 0, or before it existed), said once."""
    if (split_dir / "calibration.csv").exists() and read_manifest(split_dir, "calibration"):
        return "calibration"
    _log.warning("%s: no calibration images (split.calibration_fraction 0, or a split made before it existed); "
                 "temperatures and prediction-set thresholds are fitted on the validation split, which also chose "
                 "each model, so the sets may cover a little less than evaluate.coverage", split_dir)
    return "val"


@dataclass(frozen=True)
class Calibrated:
    """A model's log-probabilities on the validation split (what chose it) and on the calibration
    split (what chose nothing), their labels, and the temperature fitted on the latter."""

    val_scores: np.ndarray
    val_labels: np.ndarray
    cal_scores: np.ndarray
    cal_labels: np.ndarray
    temperature: float

    def val_probabilities(self) -> np.ndarray:
        return scaled(self.val_scores, self.temperature)

    def cal_probabilities(self) -> np.ndarray:
        return scaled(self.cal_scores, self.temperature)

    def threshold(self, coverage: float) -> float:
        """The conformal threshold of the calibrated calibration-split probabilities (the same
        images fit T: one parameter, so its effect on the coverage is small; the test coverage says)."""
        return conformal_threshold(conformity_scores(self.cal_probabilities(), self.cal_labels), coverage)


def _ensemble(name: str, settings: EnsembleParams, members: dict[str, VariantResult], fitted: dict[str, Calibrated],
              labels: np.ndarray, classes: list[str], cfg: EvaluateParams, *, seed: int) -> VariantResult:
    """The mean of the members' probabilities (calibrated ones for ``calibrated_mean``: as each is
    served), itself calibrated on the calibration split (a mean of calibrated models is usually
    under-confident: T < 1 sharpens it). Its validation accuracy, which it competes for champion
    with, is its members' mean on the validation split (which chose each of them, as it chose
    every variant's epoch)."""
    calibrated = settings.combine == "calibrated_mean"

    def mean(split: str) -> np.ndarray:
        parts = [(fitted[m].val_probabilities() if calibrated else np.exp(fitted[m].val_scores)) if split == "val" else
                 (fitted[m].cal_probabilities() if calibrated else np.exp(fitted[m].cal_scores))
                 for m in settings.members]
        return np.log(np.clip(ensemble_probabilities(parts), 1e-300, 1.0))

    test_probs = ensemble_probabilities([members[m].calibrated if calibrated else members[m].probs
                                         for m in settings.members])
    first = fitted[settings.members[0]]
    val_scores, cal_scores = mean("val"), mean("calibration")
    mine = Calibrated(val_scores, first.val_labels, cal_scores, first.cal_labels,
                      _fit(name, cal_scores, first.cal_labels))
    val_probs = np.exp(val_scores)
    val_labels = first.val_labels
    result = score(name, test_probs, labels, classes=classes, bootstrap_samples=cfg.bootstrap_samples,
                   confidence=cfg.confidence, seed=seed, val_accuracy=float((val_probs.argmax(1) == val_labels).mean()),
                   parameters=sum(members[m].parameters for m in settings.members), temperature=mine.temperature,
                   conformal_threshold=mine.threshold(cfg.coverage))
    return dataclasses.replace(result, macs=sum(members[m].macs for m in settings.members))


def _seconds_per_image(model: Classifier, batch: torch.Tensor, rt: Runtime, *, passes: int) -> float:
    """A model's time per image on one evaluate batch (median of 3, after a warm-up), times its
    forward passes per image as served (1 + its test-time views): for the comparison's cost
    column, which is this machine's, so it stays out of the metrics files."""
    model.to(rt.device).to(memory_format=torch.channels_last)
    batch = batch.to(rt.device).contiguous(memory_format=torch.channels_last)
    times = []
    with torch.inference_mode():
        for _ in range(4):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return passes * float(np.median(times[1:])) / len(batch)


def _macs(model: Classifier, image: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass on one image: what a model costs, the same on any
    machine (the comparison's cost column; time is this machine's, see `_relative_time`)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops() // 2


def _relative_cost(results: list[VariantResult], ensembles: dict[str, EnsembleParams]) -> dict[str, str]:
    """The comparison's cost column: MACs per image as served, and an ensemble's as a multiple of
    its cheapest member's."""
    macs = {r.name: r.macs for r in results}
    out = {name: f"{m / 1e6:,.1f} M" for name, m in macs.items()}
    for name, s in ensembles.items():
        out[name] += f" ({macs[name] / max(1, min(macs[m] for m in s.members)):.1f}x its cheapest)"
    return out


def _relative_time(timing: dict[str, float], ensembles: dict[str, EnsembleParams], batch: int) -> str:
    """Time per image on this machine (printed and logged to MLflow, never in the committed files):
    an ensemble's as a multiple of its fastest member's."""
    parts = [f"{name} {1000 * t:.2f} ms" + (f" ({t / min(timing[m] for m in ensembles[name].members):.1f}x its "
                                           "fastest member)" if name in ensembles else "")
             for name, t in timing.items()]
    return f"Time per image on this machine (batches of {batch}, as served): " + ", ".join(parts)


def _fit(name: str, scores: np.ndarray, labels: np.ndarray) -> float:
    temperature = fit_temperature(scores, labels)
    if at_bound(temperature):
        _log.warning("%s: the temperature fitted on the calibration split is at its bound (%.3g): the split is "
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
             "Validation accuracy is what chose each model (from training; an ensemble's from its members' "
             "validation answers, which it competes for champion with); an ensemble averages its members' "
             "(calibrated) probabilities. MACs: multiply-accumulates per image as served (test-time views "
             "included; an ensemble runs every member). T: the temperature fitted on the calibration split by NLL, "
             "which the served model applies (it leaves every prediction, so accuracy and McNemar, as "
             "they are); test NLL and ECE (15 equal-width bins) before -> after it. Set coverage: share of test "
             "images whose prediction set (threshold from the calibration split) holds the true class.\n\n"
             "McNemar, exact: b = images only A classifies right, c = only B; p_holm corrects for testing "
             "every pair.\n\n")
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


def _log_variant_runs(run_ids: dict[str, str | None], results: dict[str, VariantResult], models: Path,
                      timing: dict[str, float]) -> None:
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
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in
                                          {**results[name].metrics(), **_time_metric(timing, name)}.items()])


def _time_metric(timing: dict[str, float], name: str) -> dict[str, float]:
    return {"inference_ms_per_image": 1000 * timing[name]} if name in timing else {}


def _log_ensemble_runs(experiment: str, seed: int, ensembles: dict[str, tuple[EnsembleParams, VariantResult]],
                       run_ids: dict[str, str | None], timing: dict[str, float],
                       runtime_tags: dict[str, str]) -> dict[str, dict]:
    """One MLflow run per ensemble, as a training stage makes one per variant: its settings,
    validation accuracy (what it competes for champion with) and test metrics, tagged with its
    members' runs; returns what `register` needs of each (`EvaluatePaths.ensembles_file`)."""
    import mlflow

    out = {}
    for name, (settings, r) in ensembles.items():
        tags = {"variant": name, "kind": "ensemble", **runtime_tags,
                **{f"member_run_id.{m}": run_ids[m] for m in settings.members if run_ids.get(m)}}
        params = {"seed": seed, "members": ",".join(settings.members), "combine": settings.combine}
        with tracked_run(experiment=experiment, run_name=name, tags=tags, params=params) as run:
            mlflow.log_metrics({"val_accuracy": r.val_accuracy, **r.metrics(), **_time_metric(timing, name)})
        out[name] = {"run_id": run.info.run_id, "variant": name, "val_accuracy": r.val_accuracy,
                     "members": list(settings.members), "combine": settings.combine}
    return out


def _log_summary_run(experiment: str, logged_params: dict, mcnemar: pd.DataFrame, out: Path, plots: Path,
                     run_ids: dict[str, str | None], runtime_tags: dict[str, str]) -> None:
    """One run for the comparison: the p-values, the tables and figures. The tags point at the
    runs that were evaluated (the ensembles' too)."""
    import mlflow

    tags = {"stage": "evaluate", **runtime_tags, **{f"run_id.{k}": v for k, v in run_ids.items() if v}}
    with tracked_run(experiment=experiment, run_name="evaluate", tags=tags, params=logged_params):
        mlflow.log_metrics({f"mcnemar_p.{a}_vs_{b}": p for a, b, p in
                            zip(mcnemar["variant_a"], mcnemar["variant_b"], mcnemar["p_value"])})
        for name in ("comparison.csv", "comparison.md", "mcnemar.csv", "per_class.csv", "label_issues.csv"):
            if not (out / name).exists():  # label_issues.csv: only with a feature_extract variant
                continue
            mlflow.log_artifact(str(out / name), "evaluation")
        for png in sorted(plots.glob("*.png")):
            mlflow.log_artifact(str(png), "plots")


def _dvc_metrics(results: list[VariantResult], mcnemar: pd.DataFrame, stages_trained: list[str]) -> dict:
    """Only what the models and params determine, rounded, so a re-run writes the same bytes."""
    # p-values (keys ending in _p) to 6 significant digits, not decimals: a strong difference has p << 1e-6.
    metrics: dict = {r.name: {k: float(f"{v:.6g}") if k.endswith("_p") else round(v, 6) for k, v in r.metrics().items()}
                     for r in results}
    for r in results:  # an ensemble's validation accuracy is evaluate's (a trained variant's is in its stage's metrics)
        if r.name not in stages_trained:
            metrics[r.name] = {"val_accuracy": round(r.val_accuracy, 6), **metrics[r.name]}
    metrics["mcnemar"] = {f"{a}_vs_{b}": float(f"{p:.6g}") for a, b, p in
                          zip(mcnemar["variant_a"], mcnemar["variant_b"], mcnemar["p_value"])}
    return metrics
