"""Test-set statistics for the `evaluate` stage: pure numpy / scikit-learn / scipy, no I/O.

Everything works on arrays of class probabilities (N, K) and integer labels (N,), so a single
variant and the ensemble (the mean of the variants' probabilities) are scored the same way.
Randomness (the bootstrap) comes from a seeded numpy Generator only: same inputs, same numbers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import softmax as _softmax
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix as _confusion_matrix
from sklearn.metrics import f1_score, precision_recall_fscore_support

from cnnlab.evaluation.calibration import expected_calibration_error, scaled
from cnnlab.evaluation.conformal import coverage_and_size, prediction_sets

# Clipping p(true class) at 1e-15 caps one sample's loss at ~34.5 nats (scikit-learn's old
# log_loss default), so a single confidently wrong image cannot make the mean infinite.
_MIN_PROBABILITY = 1e-15
# Resamples drawn per chunk: bounds memory at chunk * N indices (8 MB for 5,000 test images).
_BOOTSTRAP_CHUNK = 200


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (fp32 logits lose precision in the tail probabilities)."""
    return _softmax(np.asarray(logits, dtype=np.float64), axis=1)


def accuracy(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(np.mean(np.asarray(labels) == np.asarray(predicted)))


def bootstrap_interval(correct: np.ndarray, *, samples: int, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of a 0/1 ``correct`` vector (i.e. accuracy).

    Resamples the test images with replacement ``samples`` times. Every variant is resampled
    with the same seed, hence the same resampled index sets, so their intervals differ only by
    the models, not by Monte Carlo noise.
    """
    correct = np.asarray(correct, dtype=np.float64)
    n = len(correct)
    if n == 0:
        raise ValueError("bootstrap_interval: no test examples")
    if samples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_interval: need samples >= 1 and 0 < confidence < 1 "
                         f"(got {samples}, {confidence})")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, samples - start)
        means[start:start + size] = correct[rng.integers(0, n, size=(size, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(low), float(high)


def mean_cross_entropy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-probability of the true class (natural log), from probabilities."""
    p_true = np.asarray(probs, dtype=np.float64)[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p_true, _MIN_PROBABILITY, 1.0))))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of the per-class F1; a class never predicted counts as F1 = 0."""
    return float(f1_score(labels, predicted, labels=np.arange(num_classes), average="macro", zero_division=0))


def per_class_metrics(labels: np.ndarray, predicted: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """One row per class: class, precision, recall, f1, support (0 where undefined)."""
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=np.arange(len(classes)), zero_division=0)
    return pd.DataFrame({"class": list(classes), "precision": precision, "recall": recall, "f1": f1,
                         "support": support.astype(np.int64)})


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class (every class, even if absent)."""
    return _confusion_matrix(labels, predicted, labels=np.arange(num_classes))


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test on paired correctness: b = only A right, c = only B right."""

    b: int
    c: int
    p_value: float


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> McNemar:
    """Exact (binomial) McNemar test: under H0 (equal error rates) b ~ Binomial(b + c, 1/2).

    Only the discordant images carry information; the exact form is valid for any b + c, where
    the chi-squared approximation needs b + c >= ~25. No discordant images: p = 1.
    """
    a, b_ = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b_.shape:
        raise ValueError(f"mcnemar: paired vectors differ in shape ({a.shape} vs {b_.shape})")
    b = int(np.sum(a & ~b_))
    c = int(np.sum(~a & b_))
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b=b, c=c, p_value=p)


def ensemble_probabilities(probs: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of the members' class probabilities (soft voting), every member weighted equally."""
    if not probs:
        raise ValueError("ensemble_probabilities: no members")
    shapes = {np.shape(p) for p in probs}
    if len(shapes) != 1:
        raise ValueError(f"ensemble_probabilities: members disagree in shape {sorted(shapes)}")
    return np.mean(np.stack([np.asarray(p, dtype=np.float64) for p in probs]), axis=0)


@dataclass(frozen=True)
class TtaReport:
    """A model's test-time views (`cnnlab.evaluation.tta`) on test, served or not: whether they are
    served (``used``, chosen on validation, with that McNemar p-value), the test accuracy with them,
    its interval, and the exact McNemar p-value against the same model without them."""

    used: bool
    val_p: float
    test_accuracy: float
    ci: tuple[float, float]
    test_p: float


@dataclass(frozen=True)
class VariantResult:
    """One model (a trained variant or an ensemble) scored on the test split."""

    name: str
    probs: np.ndarray  # (N, K) float64
    predicted: np.ndarray  # (N,) argmax of probs
    correct: np.ndarray  # (N,) bool
    test_accuracy: float
    ci_low: float
    ci_high: float
    test_loss: float
    macro_f1: float
    per_class: pd.DataFrame  # per_class_metrics
    confusion: np.ndarray  # (K, K)
    val_accuracy: float | None  # a trained variant's from training, an ensemble's from its members' (None: unknown)
    parameters: int
    temperature: float  # fitted on the validation split; 1.0 = as the model is
    calibrated: np.ndarray  # (N, K) probs after temperature scaling: what the served model answers
    test_ece: float  # of probs
    test_ece_calibrated: float
    test_loss_calibrated: float
    conformal_threshold: float  # of the calibrated probabilities, from validation (1.0: every class)
    covered: np.ndarray  # (N,) bool: the prediction set holds the true class
    coverage_ci: tuple[float, float]
    set_size: float  # mean classes per prediction set
    tta: TtaReport | None = None  # test-time augmentation, when evaluate.tta names views (not an ensemble's own)
    macs: int = 0  # multiply-accumulates per image as served (views included; an ensemble's: its members'); 0 = not counted

    def metrics(self) -> dict[str, float]:
        """The headline numbers under the names every variant's MLflow run and the DVC metrics use."""
        return {"test_accuracy": self.test_accuracy, "test_accuracy_ci_low": self.ci_low,
                "test_accuracy_ci_high": self.ci_high, "test_loss": self.test_loss, "test_macro_f1": self.macro_f1,
                "temperature": self.temperature, "test_loss_calibrated": self.test_loss_calibrated,
                "test_ece": self.test_ece, "test_ece_calibrated": self.test_ece_calibrated,
                "conformal_threshold": self.conformal_threshold, "test_coverage": float(self.covered.mean()),
                "test_coverage_ci_low": self.coverage_ci[0], "test_coverage_ci_high": self.coverage_ci[1],
                "test_set_size": self.set_size, **self._tta_metrics()}

    def _tta_metrics(self) -> dict[str, float]:
        if self.tta is None:
            return {}
        return {"tta_used": float(self.tta.used), "tta_val_p": self.tta.val_p,
                "test_accuracy_tta": self.tta.test_accuracy, "test_accuracy_tta_ci_low": self.tta.ci[0],
                "test_accuracy_tta_ci_high": self.tta.ci[1], "tta_test_p": self.tta.test_p}


def score(
    name: str,
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    classes: Sequence[str],
    bootstrap_samples: int,
    confidence: float,
    seed: int,
    val_accuracy: float | None,
    parameters: int,
    temperature: float = 1.0,
    conformal_threshold: float = 1.0,
) -> VariantResult:
    """Every statistic for one model's test probabilities, before and after scaling them by
    ``temperature``, and of its prediction sets at ``conformal_threshold`` (both fitted on
    validation: `cnnlab.evaluation.calibration`, `cnnlab.evaluation.conformal`)."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probs.shape != (len(labels), len(classes)):
        raise ValueError(f"{name}: probabilities of shape {probs.shape}, expected ({len(labels)}, {len(classes)})")
    predicted = probs.argmax(axis=1)
    correct = predicted == labels
    low, high = bootstrap_interval(correct, samples=bootstrap_samples, confidence=confidence, seed=seed)
    # Clipped before the log: a probability that underflowed to 0 stays ~0 after scaling.
    calibrated = scaled(np.log(np.clip(probs, 1e-300, 1.0)), temperature)
    covered, set_size = coverage_and_size(prediction_sets(calibrated, conformal_threshold), labels)
    return VariantResult(
        name=name, probs=probs, predicted=predicted, correct=correct, test_accuracy=float(correct.mean()),
        ci_low=low, ci_high=high, test_loss=mean_cross_entropy(probs, labels),
        macro_f1=macro_f1(labels, predicted, len(classes)), per_class=per_class_metrics(labels, predicted, classes),
        confusion=confusion_matrix(labels, predicted, len(classes)), val_accuracy=val_accuracy,
        parameters=parameters, temperature=float(temperature), calibrated=calibrated,
        test_ece=expected_calibration_error(probs, labels), test_ece_calibrated=expected_calibration_error(calibrated, labels),
        test_loss_calibrated=mean_cross_entropy(calibrated, labels), conformal_threshold=float(conformal_threshold),
        covered=covered, set_size=set_size,
        coverage_ci=bootstrap_interval(covered, samples=bootstrap_samples, confidence=confidence, seed=seed))


def comparison_table(results: Sequence[VariantResult]) -> pd.DataFrame:
    """One row per model, in the given order (params.yaml's: the ensembles last)."""
    return pd.DataFrame([{
        "variant": r.name, "val_accuracy": r.val_accuracy, "test_accuracy": r.test_accuracy,
        "ci_low": r.ci_low, "ci_high": r.ci_high, "test_loss": r.test_loss, "macro_f1": r.macro_f1,
        "parameters": r.parameters, "macs": r.macs, "temperature": r.temperature, "test_loss_calibrated": r.test_loss_calibrated,
        "ece": r.test_ece, "ece_calibrated": r.test_ece_calibrated,
        "coverage": float(r.covered.mean()), "coverage_ci_low": r.coverage_ci[0],
        "coverage_ci_high": r.coverage_ci[1], "set_size": r.set_size,
        "tta_used": None if r.tta is None else r.tta.used,
        "tta_val_p": None if r.tta is None else r.tta.val_p,
        "test_accuracy_tta": None if r.tta is None else r.tta.test_accuracy,
        "tta_ci_low": None if r.tta is None else r.tta.ci[0],
        "tta_ci_high": None if r.tta is None else r.tta.ci[1],
        "tta_test_p": None if r.tta is None else r.tta.test_p,
    } for r in results]).astype({"val_accuracy": "float64", "parameters": "int64", "macs": "int64"})


def comparison_markdown(table: pd.DataFrame, confidence: float, cost: dict[str, str] | None = None) -> str:
    """The comparison table for people: accuracies in %, the interval in one column; ``cost``
    (model -> text) adds what each costs per image."""
    level = f"{confidence * 100:g}% CI"
    shown = pd.DataFrame({
        "variant": table["variant"],
        "parameters": [f"{p:,}" for p in table["parameters"]],
        **({"MACs/image": [cost.get(v, "") for v in table["variant"]]} if cost else {}),
        "val acc": [_percent(v) for v in table["val_accuracy"]],
        "test acc": [_percent(v) for v in table["test_accuracy"]],
        level: [f"[{lo * 100:.2f}, {hi * 100:.2f}]" for lo, hi in zip(table["ci_low"], table["ci_high"])],
        "macro F1": [f"{v:.4f}" for v in table["macro_f1"]],
        # Calibration: negative log-likelihood and expected calibration error (15 bins), as the
        # model is -> after its temperature T (fitted on validation; the served model applies it).
        "T": [f"{v:.3f}" for v in table["temperature"]],
        "test NLL": [f"{a:.4f} -> {b:.4f}" for a, b in zip(table["test_loss"], table["test_loss_calibrated"])],
        "test ECE": [f"{a:.4f} -> {b:.4f}" for a, b in zip(table["ece"], table["ece_calibrated"])],
        # Conformal prediction sets (threshold from validation): share of test images whose set
        # holds the true class, with its interval, and the mean number of classes per set.
        "set coverage": [f"{c * 100:.2f}% [{lo * 100:.2f}, {hi * 100:.2f}]" for c, lo, hi in
                         zip(table["coverage"], table["coverage_ci_low"], table["coverage_ci_high"])],
        "set size": [f"{v:.2f}" for v in table["set_size"]],
    })
    if table["tta_used"].notna().any():
        # Test-time augmentation: served with it or not (chosen on validation: McNemar p there), and
        # its test accuracy with interval and McNemar p against the same model without it.
        shown["TTA"] = ["" if pd.isna(u) else f"{'on' if u else 'off'} (val p {p:.2g})"
                        for u, p in zip(table["tta_used"], table["tta_val_p"])]
        shown["test acc, TTA"] = ["" if pd.isna(a) else f"{a * 100:.2f}% [{lo * 100:.2f}, {hi * 100:.2f}]"
                                  for a, lo, hi in zip(table["test_accuracy_tta"], table["tta_ci_low"],
                                                       table["tta_ci_high"])]
        shown["TTA p (test)"] = ["" if pd.isna(p) else f"{p:.3g}" for p in table["tta_test_p"]]
    # disable_numparse: tabulate would otherwise re-parse "0.8600" as a number and print 0.86.
    return shown.to_markdown(index=False, colalign=("left", *["right"] * (shown.shape[1] - 1)),
                             disable_numparse=True) + "\n"


def mcnemar_markdown(table: pd.DataFrame) -> str:
    """The McNemar table for people: accuracies in %, p-values to 3 significant digits."""
    shown = table.assign(accuracy_a=[_percent(v) for v in table["accuracy_a"]],
                         accuracy_b=[_percent(v) for v in table["accuracy_b"]],
                         p_value=[f"{v:.3g}" for v in table["p_value"]],
                         p_holm=[f"{v:.3g}" for v in table["p_holm"]])
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def _percent(value: float | None) -> str:
    return "" if value is None or math.isnan(value) else f"{value * 100:.2f}%"


def best_by_validation(results: Sequence[VariantResult]) -> VariantResult:
    """The variant a person would have deployed: highest validation accuracy, first on ties.

    Chosen on validation, never on test, so comparing the ensemble with it is a fair test.
    """
    candidates = [r for r in results if r.val_accuracy is not None and not math.isnan(r.val_accuracy)]
    if not candidates:
        raise ValueError("best_by_validation: no variant has a validation accuracy")
    return max(candidates, key=lambda r: r.val_accuracy)  # max keeps the first of equal keys


def mcnemar_pairs(variants: Sequence[str], ensemble: str | None, best: str | None) -> list[tuple[str, str]]:
    """Every pair of variants in table order, then (ensemble, best single variant) if given."""
    pairs = list(itertools.combinations(variants, 2))
    if ensemble is not None and best is not None:
        pairs.append((ensemble, best))
    return pairs


def mcnemar_table(results: Sequence[VariantResult], pairs: Sequence[tuple[str, str]]) -> pd.DataFrame:
    """One row per pair: accuracies, discordant counts b (only A right) and c (only B right),
    the exact p-value and the Holm-adjusted p-value (family-wise error over all rows)."""
    by_name = {r.name: r for r in results}
    rows = []
    for a, b in pairs:
        test = mcnemar(by_name[a].correct, by_name[b].correct)
        rows.append({"variant_a": a, "variant_b": b, "accuracy_a": by_name[a].test_accuracy,
                     "accuracy_b": by_name[b].test_accuracy, "b": test.b, "c": test.c, "p_value": test.p_value})
    table = pd.DataFrame(rows, columns=["variant_a", "variant_b", "accuracy_a", "accuracy_b", "b", "c", "p_value"])
    table["p_holm"] = holm(table["p_value"].to_numpy())
    return table


def holm(p_values: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values: several pairwise tests at once would otherwise find a
    'significant' difference by chance far more often than the nominal level."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order]) if m else p
    out = np.empty(m)
    out[order] = np.minimum(adjusted, 1.0)
    return out
