"""A model's per-class view of a test set: accuracy per class, the confusion matrix and the
misclassified images with their confidence; written to a folder (per_class.json,
confusion.png) and to a W&B run (confusion-matrix panel, misclassified table)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wandb

from cifar_exp import data, plots
from cifar_exp.loop import Predictions

PER_CLASS, CONFUSION = "per_class.json", "confusion.png"
TABLE_IMAGES = 100  # misclassified images in the W&B table, a few of each true class


@dataclass(frozen=True)
class ClassView:
    test_set: data.ImageSet
    predictions: Predictions
    epoch: int  # of the checkpoint that predicted

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

    def misclassified(self, limit: int = TABLE_IMAGES) -> list[int]:
        """Indices of up to `limit` misclassified images, balanced over the true classes."""
        wrong = (self.predictions.predicted != self.predictions.targets).nonzero().flatten()
        wrong = wrong.numpy()
        return wrong[data.balanced_subset(self.predictions.targets.numpy()[wrong], limit)].tolist()

    def write(self, folder: Path) -> dict[str, Any]:
        """per_class.json and confusion.png in the folder; returns the summary."""
        summary = self.summary()
        (folder / PER_CLASS).write_text(json.dumps(summary, indent=2) + "\n")
        title = f"Confusion matrix, epoch {self.epoch} ({100 * summary['accuracy']:.2f}%)"
        plots.plot_confusion(self.confusion, self.classes, title, folder / CONFUSION)
        return summary

    def log(self, run: Any) -> None:
        """Per-class accuracy into the summary, W&B's confusion-matrix panel, and a table of
        misclassified test images with true class, predicted class and confidence; in the
        run's current history row (not committed: no extra step)."""
        names, p = self.classes, self.predictions
        run.summary.update({f"class_acc/{k}": v for k, v in self.accuracy_by_class.items()})
        table = wandb.Table(columns=["image", "true", "predicted", "confidence"])
        for i in self.misclassified():
            table.add_data(wandb.Image(self.test_set.images[i]), names[p.targets[i]],
                           names[p.predicted[i]], float(p.confidence[i]))  # fmt: skip
        run.log(
            {
                "confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=p.targets.tolist(), preds=p.predicted.tolist(), class_names=list(names)
                ),
                "misclassified": table,
            },
            commit=False,
        )
