"""The training loop: plain PyTorch, whatever model, optimizer and scheduler it is given."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from cifar_exp import checkpoint, data, interrupt
from cifar_exp.errors import TrainingDiverged

log = logging.getLogger(__name__)

# What fit records for every epoch, in metrics.jsonl and in the tracker.
EPOCH_METRICS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
    "images_per_second",
)  # fmt: skip


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


def check_finite(loss: float, epoch: int, step: int) -> None:
    if not math.isfinite(loss):
        raise TrainingDiverged(
            f"the training loss became {loss} at epoch {epoch}, step {step}: training diverged. "
            "checkpoints/last.pt still holds the last good epoch; lower optimizer.lr "
            "or change the scheduler and start again"
        )


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, device: torch.device
) -> tuple[float, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the loader, and the predicted and true class of every image."""
    model.eval()
    loss_sum, predictions, targets = 0.0, [], []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(1).cpu())
        targets.append(labels.cpu())
    predictions, targets = torch.cat(predictions), torch.cat(targets)
    return loss_sum / len(targets), predictions, targets


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    epochs: int,
    device: torch.device,
    run_dir: Path,
    tracker: Any,
    scheduler_interval: str = "epoch",
    scheduler_monitor: str | None = None,
    checkpoint_extra: dict | None = None,
    progress: bool = True,
    start_epoch: int = 1,
    best_test_acc: float = -1.0,
    seed: int | None = None,
) -> list[dict]:
    """Train for `epochs`, testing after each; returns the per-epoch metrics.

    Each epoch appends one JSON line to run_dir/metrics.jsonl, logs the same to `tracker`
    (a W&B run) and writes checkpoints/last.pt, and checkpoints/best.pt when test accuracy
    improves. The scheduler steps after every batch (interval "step") or every epoch, given
    the monitored metric if it has one (ReduceLROnPlateau).

    A resumed run starts at `start_epoch` with the checkpoint's `best_test_acc`. With a
    `seed`, each epoch's shuffle and augmentation depend on (seed, epoch) only, so a resumed
    run repeats them exactly. A NaN or infinite loss raises TrainingDiverged before its step
    is applied; a stop signal (see `interrupt`) raises Interrupted after a finished step.
    """
    model.to(device)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    history: list[dict] = []
    best_acc = best_test_acc
    for epoch in range(start_epoch, epochs + 1):
        if seed is not None:
            data.seed_epoch(train_loader, seed, epoch)
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]

        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch}/{epochs}", disable=not progress, leave=False)
        for step, (images, labels) in enumerate(bar, 1):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
            loss_value = loss.item()
            check_finite(loss_value, epoch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler_interval == "step":
                scheduler.step()
            loss_sum += loss_value * len(labels)
            correct += (logits.argmax(1) == labels).sum().item()
            seen += len(labels)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
            interrupt.raise_if_requested(epoch, step)
        train_seconds = time.perf_counter() - start

        test_loss, predictions, targets = evaluate(model, test_loader, device)
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": test_loss,
            "test_acc": (predictions == targets).float().mean().item(),
            "lr": lr,
            "epoch_seconds": time.perf_counter() - start,
            "images_per_second": seen / train_seconds,
        }
        if scheduler_interval == "epoch":
            if scheduler_monitor:
                scheduler.step(metrics[scheduler_monitor])
            else:
                scheduler.step()

        history.append(metrics)
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
            model, optimizer, scheduler, epoch=epoch, metrics=metrics,
            best_test_acc=max(best_acc, metrics["test_acc"]), **(checkpoint_extra or {}),
        )  # fmt: skip
        checkpoint.save(state, run_dir / "checkpoints" / "last.pt")
        if metrics["test_acc"] > best_acc:
            best_acc = metrics["test_acc"]
            checkpoint.save(state, run_dir / "checkpoints" / "best.pt")
    return history
