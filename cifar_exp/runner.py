"""The training loop: plain PyTorch, whatever model, optimizer and scheduler it is given."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cifar_exp import checkpoint, data, distributed, fast_layers, interrupt
from cifar_exp.errors import TrainingDiverged, UserError

log = logging.getLogger(__name__)

# What fit records for every epoch, in metrics.jsonl and in the tracker.
EPOCH_METRICS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
    "images_per_second",
)  # fmt: skip
VAL_METRICS = ("val_loss", "val_acc")  # added when fit is given a validation loader
CHECK_EVERY = 20  # steps between loss checks and progress-bar updates (each waits for the GPU)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (CUDA too); optionally allow deterministic kernels only.

    Both are set on every call: the jobs of a multirun share one process.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False


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


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where and how the model computes; every speed option can be switched off on its own."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    channels_last: bool = False
    compile: bool = False
    subsampled_convs: bool = False  # see fast_layers
    packed_dropout: bool = False

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling keeps float16 gradients from underflowing; a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 that runs at speed: Ampere or newer GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_compute(device: torch.device, options: Mapping[str, Any]) -> Compute:
    """The speed options of a trainer config (`options`) for `device`; an option missing (a
    checkpoint older than it) or "auto" takes the measured default.

    precision auto: bf16 autocast where the device runs bf16 natively, else fp32.
    compile auto: on for CUDA; off elsewhere (on the CPU it did not pay back its compile time,
    see BENCHMARKS.md).
    subsampled_convs and packed_dropout auto: on for the CPU, the only device measured.
    """
    precision = options.get("precision", "auto")
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"
    if precision not in PRECISIONS:
        raise UserError(
            f"trainer.precision must be auto or one of {', '.join(PRECISIONS)}, got {precision!r}"
        )
    on_cpu = device.type == "cpu"

    def choice(key: str, auto: bool) -> bool:
        value = options.get(key, "auto")
        return auto if value == "auto" else bool(value)

    return Compute(
        device,
        PRECISIONS[precision],
        channels_last=bool(options.get("channels_last", True)),
        compile=choice("compile", device.type == "cuda"),
        subsampled_convs=choice("subsampled_convs", on_cpu),
        packed_dropout=choice("packed_dropout", on_cpu),
    )


def prepare_model(model: nn.Module, compute: Compute) -> nn.Module:
    """Swap in the fast layers chosen, move the model to the device and layout; returns what
    to call (in DDP when several processes train, compiled or not).

    Both share their parameters with `model`, whose state_dict stays the one to save.
    """
    fast_layers.swap_in(model, convs=compute.subsampled_convs, dropout=compute.packed_dropout)
    model.to(compute.device, memory_format=compute.memory_format)
    forward = distributed.wrap(model, compute.device)
    return torch.compile(forward) if compute.compile else forward


def to_device(
    images: torch.Tensor, labels: torch.Tensor, compute: Compute
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on the device, in the model's layout (no copy when it already is)."""
    images = images.to(compute.device, non_blocking=True, memory_format=compute.memory_format)
    return images, labels.to(compute.device, non_blocking=True)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, compute: Compute, flip: bool = False
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the loader, and the predicted and true class of every image.

    `flip`: test-time augmentation, each image's logits averaged with its mirror image's.
    """
    model.eval()
    loss_sum, predictions, targets = 0.0, [], []
    for images, labels in loader:
        images, labels = to_device(images, labels, compute)
        with compute.autocast():
            logits = model(images)
            if flip:
                logits = (logits + model(images.flip(3))) / 2
        loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
        predictions.append(logits.argmax(1))
        targets.append(labels)
    predictions, targets = torch.cat(predictions).cpu(), torch.cat(targets).cpu()
    return float(loss_sum) / len(targets), predictions, targets


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    compute: Compute,
    scaler: torch.amp.GradScaler,
    step_scheduler: Any = None,
    bar: tqdm | None = None,
    label_smoothing: float = 0.0,
    epoch: int = 1,
) -> tuple[float, float, int]:
    """One pass over the loader; returns mean loss, accuracy and the number of images (over
    all ranks under DDP).

    `step_scheduler` steps after every batch (OneCycle). Running sums stay on the device, so
    the loop waits for the GPU only every CHECK_EVERY steps, to check the loss is finite and
    update the progress bar. A stop signal (see `interrupt`) raises Interrupted after a step.
    """
    model.train()
    recent_losses: list[torch.Tensor] = []
    loss_sum = torch.zeros((), device=compute.device)
    correct = torch.zeros((), device=compute.device, dtype=torch.long)
    seen = 0
    for step, (images, labels) in enumerate(loader, 1):
        images, labels = to_device(images, labels, compute)
        with compute.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if step_scheduler is not None:
            step_scheduler.step()
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
        interrupt.raise_if_requested(epoch, step)
    if recent_losses:
        check_finite(recent_losses, epoch, step)
    totals = torch.stack([loss_sum, correct.to(loss_sum.dtype), loss_sum.new_tensor(seen)])
    loss_total, correct_total, seen_total = distributed.sum_across_ranks(totals).tolist()
    return loss_total / seen_total, correct_total / seen_total, int(seen_total)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_loader: Iterable,
    test_loader: Iterable,
    *,
    epochs: int,
    compute: Compute,
    run_dir: Path,
    tracker: Any,
    scheduler_interval: str = "epoch",
    scheduler_monitor: str | None = None,
    checkpoint_extra: dict | None = None,
    progress: bool = True,
    label_smoothing: float = 0.0,
    start_epoch: int = 1,
    best_test_acc: float = -1.0,
    seed: int | None = None,
    scaler: torch.amp.GradScaler | None = None,
    val_loader: Iterable | None = None,
    test_flip: bool = False,
) -> list[dict]:
    """Train for `epochs`, testing after each; returns the per-epoch metrics.

    Each epoch appends one JSON line to run_dir/metrics.jsonl, logs the same to `tracker`
    (a W&B run) and writes checkpoints/last.pt, and checkpoints/best.pt when test accuracy
    improves. The scheduler steps after every batch (interval "step") or every epoch, given
    the monitored metric if it has one (ReduceLROnPlateau). With a `val_loader` (images held
    out of the training set) each epoch also records VAL_METRICS. Under DDP (`distributed`)
    every rank trains on its share of each batch and tests on the whole test set, the
    training metrics are summed over the ranks, and only rank 0 writes and logs.
    `test_flip` averages each test and validation image's logits with its mirror image's.

    A resumed run starts at `start_epoch` with the checkpoint's `best_test_acc` (and its
    `scaler`, for float16). With a
    `seed`, each epoch's shuffle and augmentation depend on (seed, epoch) only, so a resumed
    run repeats them exactly. A NaN or infinite loss raises TrainingDiverged before its step
    is saved; a stop signal (see `interrupt`) raises Interrupted after a finished step.
    """
    forward = prepare_model(model, compute)
    scaler = scaler or compute.grad_scaler()
    main = distributed.current().is_main  # under DDP rank 0 alone writes and logs
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    history: list[dict] = []
    best_acc = best_test_acc
    for epoch in range(start_epoch, epochs + 1):
        if seed is not None:
            data.seed_epoch(train_loader, seed, epoch)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        with tqdm(
            total=len(train_loader),
            desc=f"epoch {epoch}/{epochs}",
            disable=not (progress and main),
            leave=False,
        ) as bar:
            train_loss, train_acc, seen = train_epoch(
                forward, optimizer, train_loader, compute, scaler,
                step_scheduler=scheduler if scheduler_interval == "step" else None, bar=bar,
                label_smoothing=label_smoothing, epoch=epoch,
            )  # fmt: skip
        train_seconds = time.perf_counter() - start

        test_loss, predictions, targets = evaluate(forward, test_loader, compute, test_flip)
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "test_loss": test_loss,
            "test_acc": (predictions == targets).float().mean().item(),
            "lr": lr,
            "epoch_seconds": time.perf_counter() - start,
            "images_per_second": seen / train_seconds,
        }
        if val_loader is not None:
            val_loss, predictions, targets = evaluate(forward, val_loader, compute, test_flip)
            val_acc = (predictions == targets).float().mean().item()
            metrics.update(zip(VAL_METRICS, (val_loss, val_acc), strict=True))
        if scheduler_interval == "epoch":
            if scheduler_monitor:
                scheduler.step(metrics[scheduler_monitor])
            else:
                scheduler.step()

        history.append(metrics)
        if not main:
            continue
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        tracker.log(metrics, step=epoch)
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.3g  %.1fs",
            epoch,
            epochs,
            metrics["train_loss"],
            metrics["train_acc"],
            test_loss,
            metrics["test_acc"],
            lr,
            metrics["epoch_seconds"],
        )

        state = checkpoint.capture(
            model, optimizer, scheduler, epoch=epoch, metrics=metrics, scaler=scaler,
            best_test_acc=max(best_acc, metrics["test_acc"]), **(checkpoint_extra or {}),
        )  # fmt: skip
        checkpoint.save(state, run_dir / "checkpoints" / "last.pt")
        if metrics["test_acc"] > best_acc:
            best_acc = metrics["test_acc"]
            checkpoint.save(state, run_dir / "checkpoints" / "best.pt")
    return history
