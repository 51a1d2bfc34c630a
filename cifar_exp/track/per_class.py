"""A model's per-class view of a test set: accuracy per class, the confusion matrix and the
misclassified images with their confidence; written to a folder (per_class.json,
confusion.png) here, and to a W&B run by `Tracker.log_class_view`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifar_exp import files
from cifar_exp.data import datasets
from cifar_exp.engine.inference import Predictions, predict_test_set
from cifar_exp.settings import DataSettings
from cifar_exp.track import plots

PER_CLASS, CONFUSION = "per_class.json", "confusion.png"


@dataclass(frozen=True)
class ClassView:
    test_set: datasets.ImageSet
    predictions: Predictions
    epoch: int  # of the checkpoint that predicted

    @classmethod
    def of_checkpoint(
        cls, state: dict, data_settings: DataSettings, device: str, tta: str | None = None
    ) -> ClassView:
        """The checkpoint's view of the test split `data_settings` names, on `device`, with
        the test-time views `tta` (None: its training run's)."""
        return cls(*predict_test_set(state, data_settings, device, tta), state["epoch"])

    @property
    def classes(self) -> tuple[str, ...]:
        return self.test_set.classes

    @property
    def confusion(self) -> np.ndarray:
        """Counts: row the true class, column the predicted one."""
        k = len(self.classes)
        pairs = self.predictions.targets.numpy() * k + self.predictions.predicted.numpy()
        return np.bincount(pairs, minlength=k * k).reshape(k, k)

    @property
    def accuracy_by_class(self) -> dict[str, float]:
        confusion = self.confusion
        totals = confusion.sum(1)
        return {name: float(confusion[i, i] / totals[i]) if totals[i] else float("nan")
                for i, name in enumerate(self.classes)}  # fmt: skip

    def summary(self) -> dict[str, Any]:
        """What per_class.json holds."""
        correct = self.predictions.predicted == self.predictions.targets
        return {
            "epoch": self.epoch,
            "images": len(correct),
            "accuracy": correct.float().mean().item(),
            "loss": self.predictions.loss,
            "per_class_accuracy": self.accuracy_by_class,
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
        }

    def misclassified(self, limit: int) -> list[int]:
        """Indices of up to `limit` misclassified images, balanced over the true classes."""
        wrong = (self.predictions.predicted != self.predictions.targets).nonzero().flatten()
        wrong = wrong.numpy()
        return wrong[
            datasets.balanced_subset(self.predictions.targets.numpy()[wrong], limit)
        ].tolist()

    def write(self, folder: Path) -> dict[str, Any]:
        """per_class.json and confusion.png in the folder; returns the summary."""
        summary = self.summary()
        files.write_atomically(folder / PER_CLASS, json.dumps(summary, indent=2) + "\n")
        title = f"Confusion matrix, epoch {self.epoch} ({100 * summary['accuracy']:.2f}%)"
        plots.plot_confusion(self.confusion, self.classes, title, folder / CONFUSION)
        return summary
