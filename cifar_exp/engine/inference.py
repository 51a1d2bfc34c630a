"""Inference: a model's predictions over a loader, each image's logits averaged over its
test-time views (trainer.tta); the loss and accuracy the loop records; a checkpoint's
predictions on a test set, which evaluate, the run record's end and report all ask for."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from cifar_exp.data import datasets
from cifar_exp.data.loaders import Batching
from cifar_exp.engine import checkpoint
from cifar_exp.engine.compute import Compute, resolve_compute, resolve_device
from cifar_exp.engine.learner import Learner
from cifar_exp.engine.optim import evaluated_weights
from cifar_exp.settings import DataSettings, TrainerSettings, checked


class Predictions(NamedTuple):
    loss: float  # mean cross-entropy
    predicted: torch.Tensor  # the predicted class of every image
    targets: torch.Tensor  # its true class
    confidence: torch.Tensor  # the softmax probability of the predicted class


def views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The test-time views of a batch (`tta`, one of settings.TTA): `none` the images; `flip`
    they and their mirror images; `multi` those two, each also shifted by one pixel down and
    right and by one pixel up and left (borders reflected): six views."""
    flips = [images] if tta == "none" else [images, images.flip(3)]
    if tta != "multi":
        return flips
    size = images.shape[-2:]
    shifted = []
    for view in flips:
        padded = F.pad(view, (1, 1, 1, 1), mode="reflect")
        shifted += [padded[..., : size[0], : size[1]], padded[..., 2:, 2:]]
    return flips + shifted


@torch.no_grad()
def predict(
    forward: nn.Module, loader: Iterable, compute: Compute, tta: str = "none"
) -> Predictions:
    """Mean cross-entropy over the loader, and the predicted and true class of every image
    with the confidence of the prediction.

    `tta`: each image's logits are the mean of its test-time views' (`views`).
    """
    forward.eval()
    loss_sum, predictions, targets, confidences = 0.0, [], [], []
    for images, labels in loader:
        images, labels = compute.batch(images, labels)
        with compute.autocast():
            logits = torch.stack([forward(view) for view in views(images, tta)]).mean(0)
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        confidence, predicted = logits.float().softmax(1).max(1)
        predictions.append(predicted)
        confidences.append(confidence)
        targets.append(labels)
    predictions, targets = torch.cat(predictions).cpu(), torch.cat(targets).cpu()
    return Predictions(
        float(loss_sum) / len(targets), predictions, targets, torch.cat(confidences).cpu()
    )


def loss_and_accuracy(learner: Learner, loader: Iterable, tta: str) -> tuple[float, float]:
    """Mean loss and accuracy of the learner's tested weights on the loader's images."""
    loss, predictions, targets, _ = predict(learner.tested, loader, learner.compute, tta)
    return loss, (predictions == targets).float().mean().item()


def predict_test_set(
    state: dict, data_settings: DataSettings, device_name: str = "auto", tta: str | None = None
) -> tuple[datasets.ImageSet, Predictions]:
    """Run the checkpoint's tested weights (the moving average's, if its run kept one) over
    the test split `data_settings` names, with the test-time views `tta` (None: its training
    run's).

    Returns the test images and the predictions (loss, predicted and true classes, confidences).
    """
    config = state["config"]
    model = instantiate(config["model"])
    model.load_state_dict(evaluated_weights(state))
    # The training run's precision, layout, normalisation and test-time views, so its test
    # accuracy is reproduced exactly (no compiling for one pass).
    chosen = {"tta": tta, "test_flip": None} if tta is not None else {}  # over the old key too
    trainer = checked(
        TrainerSettings, {**config["trainer"], "compile": False, **chosen}, key="trainer"
    )
    compute = resolve_compute(resolve_device(device_name), trainer)
    # This process alone (no collectives): at a DDP run's end only rank 0 scores its best epoch.
    test_set = datasets.read(data_settings, "test")
    checkpoint.check_classes(state, test_set.classes, "the checkpoint")
    batching = Batching(
        data_settings.batch_size, seed=0, device=compute.device,
        num_workers=data_settings.num_workers,
    )  # fmt: skip
    loader = instantiate(config["augment"]).test_time().loader(test_set, batching)
    return test_set, predict(compute.prepare(model, alone=True), loader, compute, trainer.tta)
