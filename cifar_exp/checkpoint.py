"""Checkpoints a run resumes from exactly: written atomically, loaded without running code.

A checkpoint holds the model, optimizer, scheduler and (with mixed precision) GradScaler
state, the epoch, the best test accuracy, the random-number states of Python, NumPy and
PyTorch (CPU and CUDA), the resolved config and the W&B run id.
"""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cifar_exp.errors import UserError

# What every checkpoint written by cifar_exp.train holds, at least.
REQUIRED_KEYS = frozenset({"model", "optimizer", "scheduler", "epoch", "best_test_acc", "config"})


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, unsafe or does not fit the run."""


def rng_state() -> dict:
    """The global random-number states, as plain values that weights_only loading accepts."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def capture(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    epoch: int,
    best_test_acc: float,
    scaler: torch.amp.GradScaler | None = None,
    **extra: Any,
) -> dict:
    """Everything needed to continue training after `epoch`, plus `extra` (config, metrics...)."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "best_test_acc": best_test_acc,
        "rng": rng_state(),
        **extra,
    }


def save(checkpoint: dict, path: Path) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def load(path: Path, option: str = "trainer.resume") -> dict:
    """Load a checkpoint written by cifar_exp.train, refusing anything that would run code.

    `option` is the setting that named the file, for the message.
    """
    if not path.is_file():
        raise CheckpointError(
            f"{option}={path}: no such checkpoint file; give a run folder or its "
            "checkpoints/last.pt"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise CheckpointError(
                f"{option}={path} needs arbitrary code to load and was refused "
                "(weights_only loading). Only use checkpoints written by cifar_exp.train; "
                "if you trust this file, re-save its tensors with a trusted tool."
            ) from None
        raise CheckpointError(damaged(option, path, err)) from None
    except Exception as err:  # noqa: BLE001 - a damaged file raises any of many types
        raise CheckpointError(damaged(option, path, err)) from None
    missing = REQUIRED_KEYS - set(checkpoint) if isinstance(checkpoint, dict) else REQUIRED_KEYS
    if missing:
        raise CheckpointError(
            f"{option}={path} is not a checkpoint written by cifar_exp.train "
            f"(no {', '.join(sorted(missing))}); give a run folder or its checkpoints/last.pt"
        )
    return checkpoint


def damaged(option: str, path: Path, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{option}={path} is truncated or not a checkpoint ({first_line}); resume from "
        "another checkpoint (checkpoints/best.pt) or start the run again"
    )


def restore_model(checkpoint: dict, model: nn.Module, path: Path) -> None:
    """Load the weights, or explain that the checkpoint holds a different network."""
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[1:2] or [""]
        raise CheckpointError(
            f"{path} holds the weights of another model ({detail[0].strip()}); "
            "resume it with the model config it was trained with"
        ) from None


def restore_training(
    checkpoint: dict,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """Optimizer, scheduler and scaler state, then the random-number states, as saved."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if scaler is not None and checkpoint.get("scaler") is not None:
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_state(checkpoint["rng"])


def rewind_metrics(metrics_file: Path, epoch: int) -> list[dict]:
    """Keep the metrics of epochs 1..epoch (the checkpoint's), drop later or partial lines.

    A run killed after writing an epoch's metrics but before its checkpoint, or in the
    middle of a line, would otherwise get that epoch twice. Returns the kept records.
    """
    if not metrics_file.is_file():
        return []
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a partial last line
        if record.get("epoch") == len(kept) + 1 <= epoch:
            kept.append(record)
    tmp = metrics_file.with_name(metrics_file.name + ".tmp")
    tmp.write_text("".join(json.dumps(m) + "\n" for m in kept))
    os.replace(tmp, metrics_file)
    return kept
