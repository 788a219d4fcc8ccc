"""Figures people would rather look at than read, for `evaluate`: confusion matrices, the most
confident mistakes, test accuracy per variant, and reliability diagrams. (Training curves: `cnnlab.training.curves`.)"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

# The object API, not pyplot: it needs no backend, so importing cnnlab never switches the
# caller's (a notebook's inline backend, say), and figures are freed with their last reference.
from matplotlib.figure import Figure

# No "Software"/date metadata: the same figure gives the same bytes on a re-run.
_PNG_METADATA = {"Software": None}


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata=_PNG_METADATA)


save_figure = _save


def overlay_axes(ax, image: np.ndarray, heat: np.ndarray | None) -> None:
    """Draw a uint8 (C, H, W) image (grey when C = 1), with a [0, 1] heat map over it when given."""
    ax.axis("off")
    if image.shape[0] == 1:
        ax.imshow(image[0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.transpose(image, (1, 2, 0)))
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, *, title: str) -> None:
    """Row-normalized confusion matrix (colour = share of the true class), counts in the cells.

    Normalizing rows makes the diagonal the per-class recall, comparable across classes of
    different sizes; the raw count stays readable in each cell.
    """
    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    k = len(classes)
    side = max(4.0, 0.6 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    font = 9 if k <= 12 else 6
    for i in range(k):
        for j in range(k):
            if counts[i, j]:
                # White on the dark cells, black on the light ones.
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=font,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)


def plot_misclassified(
    images: np.ndarray,
    true_names: Sequence[str],
    predicted_names: Sequence[str],
    confidences: Sequence[float],
    path: Path,
    *,
    title: str,
    heat: np.ndarray | None = None,
) -> None:
    """A square-ish grid of mistakes, each titled "true → predicted (p)".

    ``images``: uint8 (N, C, H, W) as the model saw them; grey (C = 1) is drawn in grey. ``heat``:
    (N, H, W) Grad-CAM maps in [0, 1] drawn over them (`cnnlab.evaluation.explain`).
    """
    n = len(images)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(1.9 * cols + 0.4, 2.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (ax, img, t, p, conf) in enumerate(zip(axes.flat, images, true_names, predicted_names, confidences)):
        overlay_axes(ax, img, None if heat is None else heat[i])
        ax.set_title(f"{t} →\n{p} ({conf:.2f})", fontsize=7)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def plot_accuracy(
    names: Sequence[str],
    test_accuracy: Sequence[float],
    ci_low: Sequence[float],
    ci_high: Sequence[float],
    val_accuracy: Sequence[float | None],
    path: Path,
    *,
    confidence: float,
) -> None:
    """Test accuracy per variant with its bootstrap interval, validation accuracy beside it.

    The y axis starts just below the lowest value, not at 0: the variants differ by a few
    points, which a full axis would flatten. The axis label says so.
    """
    x = np.arange(len(names))
    width = 0.38
    test = np.asarray(test_accuracy, dtype=np.float64)
    errors = np.vstack([test - np.asarray(ci_low), np.asarray(ci_high) - test])
    val = np.array([np.nan if v is None else v for v in val_accuracy], dtype=np.float64)
    fig = Figure(figsize=(max(5.0, 1.4 * len(names) + 2.0), 4.0))
    ax = fig.subplots()
    ax.bar(x - width / 2, val, width, label="validation", color="tab:orange", alpha=0.8)
    ax.bar(x + width / 2, test, width, yerr=errors, capsize=4, label=f"test ({confidence * 100:g}% bootstrap CI)",
           color="tab:blue")
    for xi, acc, top in zip(x, test, ci_high):  # the value above the whisker, where it is not hidden
        ax.annotate(f"{acc * 100:.1f}", (xi + width / 2, top), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize=8)
    lowest = np.nanmin(np.concatenate([np.asarray(ci_low, dtype=np.float64), val]))
    ax.set_ylim(max(0.0, math.floor((lowest - 0.03) * 20) / 20), 1.0)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylabel("accuracy (axis does not start at 0)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left")  # the top-left corner is empty: the axis runs to 1.0
    ax.set_title("Accuracy per variant")
    fig.tight_layout()
    _save(fig, path)


def plot_reliability(panels: Sequence[tuple[str, float, pd.DataFrame, pd.DataFrame]], path: Path) -> None:
    """One reliability diagram per model: accuracy against mean confidence in each confidence bin,
    as the model is and after its temperature. ``panels``: (name, T, before, after), the last two
    `cnnlab.evaluation.calibration.reliability` tables. On the diagonal, confidence means what it says;
    below it the model is over-confident. Marker area follows the bin's share of the images."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(3.6 * cols, 3.6 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (name, temperature, before, after) in zip(axes, panels):
        ax.plot([0, 1], [0, 1], color="0.6", linewidth=1, linestyle="--")
        for table, label, colour in ((before, "as trained", "tab:red"), (after, f"T = {temperature:.2f}", "tab:blue")):
            share = table["count"] / max(1, int(table["count"].sum()))
            ax.plot(table["confidence"], table["accuracy"], color=colour, linewidth=1, label=label)
            ax.scatter(table["confidence"], table["accuracy"], s=10 + 400 * share, color=colour, alpha=0.6)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.set_title(name)
        ax.set_xlabel("confidence (bin mean)")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("Test reliability: below the diagonal = over-confident")
    fig.tight_layout()
    _save(fig, path)
