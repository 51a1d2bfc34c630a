"""Figures written into the run folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Train and test loss and accuracy per epoch, side by side, as in the seed."""
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split in ("train", "test"):
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in history], marker="o", label=split)
        ax_acc.plot(epochs, [100 * m[f"{split}_acc"] for m in history], marker="o", label=split)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
