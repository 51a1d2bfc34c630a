"""The checkpoint file: what it holds, written atomically, read without running code.

A checkpoint holds the learner's state (model, optimizer, scheduler and, with float16, the
GradScaler), the epoch, the random-number states of Python, NumPy and PyTorch (the CPU's, and
the GPU's the run trained on: one state, whatever the number of GPUs),
and what the run record adds: the resolved config, the classes, the W&B run id, the metrics
of its epoch and the monitored metric's best so far. Checkpoints written by earlier versions
are brought up to date as they are read (`migrate`).
"""

from __future__ import annotations

import copy
import io
import pickle
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cifar_exp import files
from cifar_exp.errors import UserError

if TYPE_CHECKING:
    from cifar_exp.engine.learner import Learner

# What every checkpoint written by cifar_exp.train holds, at least.
REQUIRED_KEYS = frozenset({"model", "optimizer", "scheduler", "epoch", "config"})
# Config targets renamed since checkpoints were first written: old name -> new name; then
# modules moved into the layered packages: old module -> new module.
RENAMED_TARGETS = {"cifar_exp.augment.pipeline": "cifar_exp.augment.Pipeline"}
MOVED_MODULES = {
    "cifar_exp.augment": "cifar_exp.data.augment",
    "cifar_exp.models": "cifar_exp.model.convnet",
    "cifar_exp.optim": "cifar_exp.engine.optim",
}


class CheckpointError(UserError):
    """A checkpoint that is missing, damaged, unsafe or does not fit the run."""


def rng_state() -> dict:
    """The global random-number states, as plain values that weights_only loading accepts.

    CUDA: the state of this process's GPU alone (None when the run does not use CUDA), so a
    checkpoint resumes on any number of GPUs. Under DDP rank 0's states are every rank's: all
    ranks draw the same random numbers (`distributed.check_lockstep`).
    """
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = {**state["numpy"], "state": dict(state["numpy"]["state"])}
    numpy_state["state"]["key"] = np.asarray(numpy_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # earlier versions kept every visible GPU's; the run used the first
        cuda = cuda[0] if cuda else None
    if cuda is not None and torch.cuda.is_initialized():  # else this run does not use CUDA
        torch.cuda.set_rng_state(cuda)


def capture(learner: Learner, *, epoch: int, **extra: Any) -> dict:
    """Everything needed to continue training after `epoch`, plus `extra` (config, metrics...)."""
    return {**learner.state_dict(), "epoch": epoch, "rng": rng_state(), **extra}


def save(checkpoint: dict, path: Path) -> None:
    """torch.save, written whole or not at all (`files.write_atomically`)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    files.write_atomically(path, buffer.getbuffer())


def require_file(path: Path, option: str = "trainer.resume") -> None:
    """Refuse a checkpoint path with no file behind it; `option` is the setting that named it."""
    if not path.is_file():
        raise CheckpointError(
            f"{option}={path}: no such checkpoint file; give a run folder or its "
            "checkpoints/last.pt"
        )


def load(path: Path, option: str = "trainer.resume") -> dict:
    """Load a checkpoint written by cifar_exp.train, refusing anything that would run code.

    `option` is the setting that named the file, for the message.
    """
    require_file(path, option)
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
    checkpoint["config"] = migrate(checkpoint["config"])
    return checkpoint


def check_classes(state: dict, classes: tuple[str, ...], source: str) -> None:
    """Refuse data whose classes differ from those the checkpoint (named by `source`) was
    trained on: its labels would silently mean other classes."""
    saved = tuple(state.get("classes") or ())
    if saved and classes != saved:
        raise CheckpointError(
            f"the data's classes ({', '.join(classes)}) differ from those {source} was trained "
            f"on ({', '.join(saved)}); point data.root at the data set it was trained on"
        )


def damaged(option: str, path: Path, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"{option}={path} is truncated or not a checkpoint ({first_line}); resume from "
        "another checkpoint (checkpoints/best.pt) or start the run again"
    )


def migrate(config: dict) -> dict:
    """An earlier version's saved config in today's layout: the budget limits were keys of
    `model` (now the top-level `budget`), and some targets had other names."""
    config = copy.deepcopy(config)
    model = config.get("model", {})
    if "max_params" in model or "min_rf" in model:
        config.setdefault("budget", {})
        for key in ("max_params", "min_rf"):
            config["budget"].setdefault(key, model.pop(key, None))

    def current(target: str) -> str:
        renamed = RENAMED_TARGETS.get(target, target)
        module, _, name = renamed.rpartition(".")
        return f"{MOVED_MODULES[module]}.{name}" if module in MOVED_MODULES else renamed

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: current(v) if k == "_target_" else rename(v) for k, v in node.items()}
        return [rename(v) for v in node] if isinstance(node, list) else node

    return rename(config)
