"""Each variant's training curves: loss and accuracy per epoch, train against validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# The object API, not pyplot: it needs no backend, so importing cnnlab never switches the
# caller's (a notebook's inline backend, say), and figures are freed with their last reference.
from matplotlib.figure import Figure


def plot_history(history: Sequence[dict[str, float]], path: Path, *, title: str, best_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train vs validation, the best epoch marked."""
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], label="train", color="tab:blue")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], label="validation", color="tab:orange")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
