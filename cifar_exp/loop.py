"""The training loop: plain PyTorch, whatever model, optimizer and schedule it is given."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from cifar_exp import distributed, interrupt, profiling
from cifar_exp.compute import Compute
from cifar_exp.errors import TrainingDiverged, call_factory
from cifar_exp.optim import WeightAverage

if TYPE_CHECKING:
    from cifar_exp.loaders import Loaders
    from cifar_exp.record import RunRecord

# What fit records for every epoch, in metrics.jsonl and in the tracker.
EPOCH_METRICS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
    "images_per_second",
)  # fmt: skip
VAL_METRICS = ("val_loss", "val_acc")  # added when there is a validation loader
# The metrics that have a best value: a loss is best lowest, an accuracy highest.
SCORES = ("train_loss", "train_acc", "test_loss", "test_acc", *VAL_METRICS)


def best_is_lowest(metric: str) -> bool:
    """Whether the best value of a score (or of best_<score>) is its lowest: a loss's."""
    return metric.endswith("loss")


CHECK_EVERY = 20  # steps between loss checks and progress-bar updates (each waits for the GPU)
# Test-time augmentation (trainer.tta): the views of each test image whose logits are averaged.
TTA = ("none", "flip", "multi")


class Schedule:
    """A learning-rate scheduler and when it steps: the one place that decides.

    Interval "step": after every optimizer step (OneCycle); "epoch": after every epoch, given
    the `monitor`ed metric when the scheduler reacts to one (ReduceLROnPlateau).
    """

    def __init__(self, scheduler: Any, interval: str = "epoch", monitor: str | None = None):
        self.scheduler, self.interval, self.monitor = scheduler, interval, monitor

    @classmethod
    def from_config(
        cls, scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> Schedule:
        """The `scheduler` config group's scheduler for `optimizer`; per-step ones (OneCycle)
        are also given the steps per epoch."""
        interval = scheduler_cfg.interval
        step_args = {"steps_per_epoch": steps_per_epoch} if interval == "step" else {}
        factory = instantiate(scheduler_cfg.lr_scheduler)
        scheduler = call_factory("scheduler.lr_scheduler", factory, optimizer, **step_args)
        return cls(scheduler, interval, scheduler_cfg.monitor)

    def after_step(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, metrics: Mapping[str, float]) -> None:
        if self.interval != "epoch":
            return
        if self.monitor:
            self.scheduler.step(metrics[self.monitor])
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


@dataclass
class Trainee:
    """What fit trains: the model and what calls it, its optimizer, schedule and loss scaler,
    and how it computes. Its state_dict is what a checkpoint keeps of it."""

    model: nn.Module  # the parameters, on their device
    forward: nn.Module  # what the loop calls: the model itself, in DDP, or compiled
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    compute: Compute
    average: WeightAverage | None = None  # trainer.ema: the weights that are tested and kept

    @property
    def tested(self) -> nn.Module:
        """What scores the test and validation images: the weights' moving average, if kept."""
        return self.average.module if self.average else self.forward

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.average.state_dict() if self.average else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Everything but the weights (loaded first, on their own: see resume)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.average:
            self.average.load_state_dict(state["ema"])


@dataclass(frozen=True)
class LoopOptions:
    epochs: int  # the last epoch to train
    seed: int  # each epoch's shuffle and augmentation come from (seed, epoch)
    label_smoothing: float = 0.0  # of the training loss only
    tta: str = "none"  # the test-time views of each test (and val) image (TTA)
    progress: bool = True  # a progress bar per epoch
    profile_steps: int | None = None  # torch.profiler over this many steps (see `profiling`)


def check_finite(losses: list[torch.Tensor], epoch: int, last_step: int) -> None:
    """Raise TrainingDiverged naming the first step whose loss is NaN or infinite.

    Called every few steps with the losses since the last call: one wait for the device each
    time, not one per step.
    """
    finite = torch.isfinite(torch.stack(losses)).tolist()
    if not all(finite):
        bad = finite.index(False)
        step, loss = last_step - len(losses) + 1 + bad, losses[bad].item()
        raise TrainingDiverged(
            f"the training loss became {loss} at epoch {epoch}, step {step}: training diverged. "
            "checkpoints/last.pt still holds the last good epoch; lower optimizer.lr "
            "or change the scheduler and start again"
        )


class Predictions(NamedTuple):
    loss: float  # mean cross-entropy
    predicted: torch.Tensor  # the predicted class of every image
    targets: torch.Tensor  # its true class
    confidence: torch.Tensor  # the softmax probability of the predicted class


def views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The test-time views of a batch (`tta`, one of TTA): `none` the images; `flip` they and
    their mirror images; `multi` those two, each also shifted by one pixel down and right and
    by one pixel up and left (borders reflected): six views."""
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


def score(trainee: Trainee, loader: Iterable, tta: str) -> tuple[float, float]:
    """Mean loss and accuracy of the trainee's tested weights on the loader's images."""
    loss, predictions, targets, _ = predict(trainee.tested, loader, trainee.compute, tta)
    return loss, (predictions == targets).float().mean().item()


def train_epoch(
    trainee: Trainee,
    loader: Iterable,
    *,
    label_smoothing: float = 0.0,
    epoch: int = 1,
    bar: tqdm | None = None,
    profiler: torch.profiler.profile | None = None,
) -> tuple[float, float, int]:
    """One pass over the loader; returns mean loss, accuracy and the number of images (over
    all ranks under DDP).

    Running sums stay on the device, so the loop waits for the GPU only every CHECK_EVERY
    steps, to check the loss is finite and update the progress bar. A stop signal (see
    `interrupt`) raises Interrupted after a step. A `profiler` is told of every step.
    """
    model, optimizer, scaler, compute = (
        trainee.forward,
        trainee.optimizer,
        trainee.scaler,
        trainee.compute,
    )
    model.train()
    recent_losses: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=compute.device)
    correct = torch.zeros((), device=compute.device, dtype=torch.long)
    seen = 0
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = compute.batch(images, labels)
        with compute.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        trainee.schedule.after_step()
        if trainee.average:
            trainee.average.after_step(trainee.model, step)
        loss_sum += loss.detach() * len(labels)
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        recent_losses.append(loss.detach())
        if step % CHECK_EVERY == 0:
            check_finite(recent_losses, epoch, step)
            recent_losses.clear()
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}"
                )
        if bar is not None:
            bar.update()
        if profiler is not None:
            profiler.step()
        interrupt.raise_if_requested(epoch, step)
    if recent_losses:
        check_finite(recent_losses, epoch, step)
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(seen)])
    loss_total, correct_total, seen_total = distributed.sum_across_ranks(totals).tolist()
    return loss_total / seen_total, correct_total / seen_total, int(seen_total)


def fit(trainee: Trainee, loaders: Loaders, options: LoopOptions, record: RunRecord) -> None:
    """Train from the record's next epoch to `options.epochs`, testing after each epoch (and
    validating, with a validation loader), stepping the schedule, and handing every epoch's
    metrics (EPOCH_METRICS, then VAL_METRICS) to the run record, which keeps them.

    Under DDP every rank trains on its share of each batch and tests on the whole test set;
    the training metrics are summed over the ranks. A NaN or infinite loss raises
    TrainingDiverged before its step is kept; a stop signal (see `interrupt`) raises
    Interrupted after a finished step, once the record has kept the weights so far. The
    record also says when the run stops early (trainer.early_stopping). With
    `options.profile_steps`, torch.profiler records that many of the first epoch's steps and
    the record keeps the profile.
    """
    profiler = None
    if options.profile_steps:
        device = trainee.compute.device
        profiler = profiling.steps_profiler(options.profile_steps, device, record.keep_profile)
    try:
        with profiler or contextlib.nullcontext():
            for epoch in range(record.next_epoch, options.epochs + 1):
                if record.stops_early:  # trainer.early_stopping, decided with the best epoch
                    break
                loaders.train.seed_epoch(options.seed, epoch)
                start = time.perf_counter()
                lr = trainee.optimizer.param_groups[0]["lr"]
                with tqdm(
                    total=len(loaders.train),
                    desc=f"epoch {epoch}/{options.epochs}",
                    disable=not (options.progress and record.writes),
                    leave=False,
                ) as bar:
                    train_loss, train_acc, seen = train_epoch(
                        trainee, loaders.train, label_smoothing=options.label_smoothing,
                        epoch=epoch, bar=bar, profiler=profiler,
                    )  # fmt: skip
                train_seconds = time.perf_counter() - start
                test_loss, test_acc = score(trainee, loaders.test, options.tta)
                metrics = dict(
                    zip(EPOCH_METRICS, (
                        epoch, train_loss, train_acc, test_loss, test_acc, lr,
                        time.perf_counter() - start, seen / train_seconds,
                    ), strict=True)
                )  # fmt: skip
                if loaders.val is not None:
                    val_scores = score(trainee, loaders.val, options.tta)
                    metrics.update(zip(VAL_METRICS, val_scores, strict=True))
                trainee.schedule.after_epoch(metrics)
                record.end_epoch(metrics, trainee)
    except interrupt.Interrupted as stop:
        record.keep_interrupted(trainee, stop)
        raise
