"""The training loop: plain PyTorch, whatever model, optimizer and schedule it is given."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cifar_exp import distributed
from cifar_exp.data.loaders import Loaders
from cifar_exp.engine import profiling, signals
from cifar_exp.engine.inference import loss_and_accuracy
from cifar_exp.engine.learner import Learner
from cifar_exp.errors import TrainingDiverged
from cifar_exp.settings import EPOCH_METRICS, VAL_METRICS, Settings

CHECK_EVERY = 20  # steps between loss checks and progress-bar updates (each waits for the GPU)


class Record(Protocol):
    """What the loop tells of each epoch, and asks: the run record (track.record) keeps it."""

    next_epoch: int  # the first epoch to train (after a resumed run's last)
    writes: bool  # whether this process writes the run's files (rank 0)

    @property
    def stops_early(self) -> bool: ...

    pruned: bool  # a search's pruner stopped the run (after the last epoch kept)

    def end_epoch(self, metrics: dict, learner: Learner) -> None: ...

    def keep_interrupted(self, learner: Learner, stop: signals.Interrupted) -> None: ...

    def keep_profile(self, profiler: torch.profiler.profile) -> None: ...


@dataclass(frozen=True)
class LoopOptions:
    epochs: int  # the last epoch to train
    seed: int  # each epoch's shuffle and augmentation come from (seed, epoch)
    label_smoothing: float = 0.0  # of the training loss only
    tta: str = "none"  # the test-time views of each test (and val) image (TTA)
    progress: bool = True  # a progress bar per epoch
    profile_steps: int | None = None  # torch.profiler over this many steps (see `profiling`)

    @classmethod
    def of(cls, settings: Settings) -> LoopOptions:
        """The loop's options from a run's checked settings."""
        trainer = settings.trainer
        return cls(
            trainer.epochs, settings.seed, trainer.label_smoothing, trainer.tta,
            trainer.progress, trainer.profile_steps,
        )  # fmt: skip


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


def train_epoch(
    learner: Learner,
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
    `signals`) raises Interrupted after a step. A `profiler` is told of every step.
    """
    model, optimizer, scaler, compute = (
        learner.forward,
        learner.optimizer,
        learner.scaler,
        learner.compute,
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
        learner.schedule.after_step()
        if learner.average:
            learner.average.after_step(learner.model, step)
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
        signals.raise_if_requested(epoch, step)
    if recent_losses:
        check_finite(recent_losses, epoch, step)
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(seen)])
    loss_total, correct_total, seen_total = distributed.sum_across_ranks(totals).tolist()
    return loss_total / seen_total, correct_total / seen_total, int(seen_total)


def fit(learner: Learner, loaders: Loaders, options: LoopOptions, record: Record) -> None:
    """Train from the record's next epoch to `options.epochs`, testing after each epoch (and
    validating, with a validation loader), stepping the schedule, and handing every epoch's
    metrics (EPOCH_METRICS, then VAL_METRICS) to the run record, which keeps them.

    Under DDP every rank trains on its share of each batch and tests on the whole test set;
    the training metrics are summed over the ranks. A NaN or infinite loss raises
    TrainingDiverged before its step is kept; a stop signal (see `signals`) raises
    Interrupted after a finished step, once the record has kept the weights so far. The
    record also says when the run stops early (trainer.early_stopping) or a search's pruner
    stopped it. With
    `options.profile_steps`, torch.profiler records that many of the first epoch's steps and
    the record keeps the profile.
    """
    profiler = None
    if options.profile_steps:
        device = learner.compute.device
        profiler = profiling.steps_profiler(options.profile_steps, device, record.keep_profile)
    try:
        with profiler or contextlib.nullcontext():
            for epoch in range(record.next_epoch, options.epochs + 1):
                # trainer.early_stopping, decided with the best epoch; a search's pruner
                if record.stops_early or record.pruned:
                    break
                loaders.train.seed_epoch(options.seed, epoch)
                start = time.perf_counter()
                lr = learner.optimizer.param_groups[0]["lr"]
                with tqdm(
                    total=len(loaders.train),
                    desc=f"epoch {epoch}/{options.epochs}",
                    disable=not (options.progress and record.writes),
                    leave=False,
                ) as bar:
                    train_loss, train_acc, seen = train_epoch(
                        learner, loaders.train, label_smoothing=options.label_smoothing,
                        epoch=epoch, bar=bar, profiler=profiler,
                    )  # fmt: skip
                train_seconds = time.perf_counter() - start
                test_loss, test_acc = loss_and_accuracy(learner, loaders.test, options.tta)
                metrics = dict(
                    zip(EPOCH_METRICS, (
                        epoch, train_loss, train_acc, test_loss, test_acc, lr,
                        time.perf_counter() - start, seen / train_seconds,
                    ), strict=True)
                )  # fmt: skip
                if loaders.val is not None:
                    val_scores = loss_and_accuracy(learner, loaders.val, options.tta)
                    metrics.update(zip(VAL_METRICS, val_scores, strict=True))
                learner.schedule.after_epoch(metrics)
                record.end_epoch(metrics, learner)
    except signals.Interrupted as stop:
        record.keep_interrupted(learner, stop)
        raise
