"""Figures written into the run folder."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from cifar_exp import files  # noqa: E402


def save(fig: plt.Figure, path: Path) -> Path:
    """The figure as a PNG at `path`, written whole or not at all; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    files.write_atomically(path, buffer.getbuffer())
    return path


def plot_curves(history: Sequence[dict], path: Path) -> Path:
    """Train, validation (if held out) and test loss and accuracy per epoch, side by side."""
    epochs = [m["epoch"] for m in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for split in [s for s in ("train", "val", "test") if f"{s}_loss" in history[0]]:
        ax_loss.plot(epochs, [m[f"{split}_loss"] for m in history], marker="o", label=split)
        ax_acc.plot(epochs, [100 * m[f"{split}_acc"] for m in history], marker="o", label=split)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: 1, 2, not 1.2, 1.4
    fig.tight_layout()
    return save(fig, path)


def plot_comparison(groups: dict[str, Sequence[Sequence[dict]]], path: Path) -> Path:
    """Test accuracy and test loss per epoch on shared axes, one line per group of runs (a
    configuration's seeds): their mean over the epochs all of them reached, with a band of
    one standard deviation when there are several."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, histories in groups.items():
        epochs = min(len(h) for h in histories)
        x = [m["epoch"] for m in histories[0][:epochs]]
        for ax, key, scale in ((ax_acc, "test_acc", 100), (ax_loss, "test_loss", 1)):
            values = scale * np.array([[m[key] for m in h[:epochs]] for h in histories])
            mean = values.mean(axis=0)
            (line,) = ax.plot(x, mean, marker="o", label=f"{label} (n={len(histories)})")
            if len(histories) > 1:
                std = values.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    banded = any(len(histories) > 1 for histories in groups.values())
    title = "Test accuracy (mean, band: ±1 std over seeds)" if banded else "Test accuracy"
    ax_acc.set(title=title, xlabel="epoch", ylabel="accuracy (%)")
    ax_loss.set(title="Test loss", xlabel="epoch", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save(fig, path)


def plot_image_grid(
    images: Sequence, captions: Sequence[str], title: str, path: Path, columns: int = 5
) -> Path:
    """uint8 HWC images in a grid, each with its caption underneath."""
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2 * columns, 2.3 * rows + 0.5), squeeze=False)
    for ax in axes.flat[len(images) :]:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions, strict=False):
        ax.imshow(image, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.set_xlabel(caption, fontsize=9)  # a label, unlike free text, gets room in the layout
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def plot_confusion(confusion: np.ndarray, classes: Sequence[str], title: str, path: Path) -> Path:
    """A confusion matrix (rows: true class, columns: predicted) with its counts."""
    fig, ax = plt.subplots(figsize=(7, 6))
    ax.imshow(confusion, cmap="Blues")
    ticks = range(len(classes))
    ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true", title=title)
    ax.set_xticklabels(classes, rotation=45, ha="right")
    ax.set_yticklabels(classes)
    dark = confusion.max() / 2
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if count > dark else "black")  # fmt: skip
    fig.tight_layout()
    return save(fig, path)


def plot_search_history(
    curves: dict[int, dict[int, float]],
    complete: dict[int, float],
    pruned: set[int],
    maximize: bool,
    metric: str,
    path: Path,
) -> Path:
    """A search's trials side by side: each trial's value by trial number (a pruned trial at
    the last value it reported, marked apart) with the best so far of the completed ones as a
    line; and each trial's reported values by epoch, its number at the end, the pruned ones
    dashed up to where they stopped. `curves`: the values each trial reported, by epoch;
    `complete`: the completed trials' values."""
    fig, (ax_history, ax_epochs) = plt.subplots(1, 2, figsize=(12, 4.5))
    numbers = sorted(complete)
    best = np.maximum.accumulate if maximize else np.minimum.accumulate
    ax_history.scatter(numbers, [complete[n] for n in numbers], label="complete", zorder=3)
    ax_history.step(numbers, best([complete[n] for n in numbers]), where="post",
                    color="tab:green", label="best so far")  # fmt: skip
    stopped = sorted(n for n in pruned if n in curves)
    last_values = [curves[n][max(curves[n])] for n in stopped]
    ax_history.scatter(stopped, last_values, marker="x", color="tab:red", zorder=3,
                       label="pruned (last reported value)")  # fmt: skip
    for number, reported in sorted(curves.items()):
        epochs = sorted(reported)
        ax_epochs.plot(epochs, [reported[e] for e in epochs], alpha=0.7,
                       linestyle="--" if number in pruned else "-", marker=".")  # fmt: skip
        if number in pruned:
            ax_epochs.plot(epochs[-1], reported[epochs[-1]], marker="x", color="tab:red")
        ax_epochs.annotate(f" {number}", (epochs[-1], reported[epochs[-1]]), fontsize=8)
    ax_history.set(title="Trials", xlabel="trial", ylabel=metric)
    ax_epochs.set(title="Reported after each epoch, by trial (dashed, x: pruned)", xlabel="epoch",
                  ylabel=f"{metric} (best so far)")  # fmt: skip
    for ax in (ax_history, ax_epochs):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_history.legend(fontsize="small")
    fig.tight_layout()
    return save(fig, path)


def plot_importance(importances: dict[str, float], metric: str, path: Path) -> Path:
    """Each parameter's importance for `metric` as a bar, the most important on top."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.4 * len(names)))
    ax.barh(names, [importances[name] for name in names])
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.3f}", va="center", fontsize=9)
    ax.set(title="Parameter importance", xlabel=f"importance for {metric}", xlim=(0, 1.1))
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return save(fig, path)
