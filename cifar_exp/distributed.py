"""Several processes, one per GPU, with DistributedDataParallel (`trainer.strategy=ddp`).

Started by torchrun, which gives each process its RANK, LOCAL_RANK and WORLD_SIZE:

    torchrun --nproc_per_node=N -m cifar_exp.train trainer.strategy=ddp

Every rank runs the same program on its share of each batch (`data.batch_size` is the global
batch); DDP averages the gradients, so the update is the one a single process would make on
the whole batch (exactly so when the norm layers do not mix images of a batch, or with
`trainer.sync_batchnorm`). Rank 0 alone writes files and logs to W&B.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

from cifar_exp.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_rank() -> int:
    """The rank torchrun gave this process (0 when not started by torchrun)."""
    return int(os.environ.get("RANK", 0))


def current() -> Ranks:
    """This process's ranks: those of the running process group, else a single process."""
    if not dist.is_initialized():
        return Ranks()
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def setup(strategy: str, device: torch.device) -> Ranks:
    """Join the process group for `ddp` under torchrun (no-op for `single`); returns this
    process's ranks.

    CUDA: NCCL, and this process's GPU is the one of its local rank. Other devices: gloo
    (CPU processes, as in the tests).
    """
    if strategy == "single":
        return Ranks()
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return current()


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """The device this rank trains on: its own GPU under DDP on CUDA, else `device`."""
    if device.type == "cuda" and ranks.world_size > 1:
        return torch.device("cuda", ranks.local_rank)
    return device


def teardown() -> None:
    """Leave the process group. After a normal end, only once every rank has come this far: a
    rank that left first could break a collective operation rank 0 still runs."""
    if not dist.is_initialized():
        return
    if sys.exc_info()[0] is None:  # not on the way out of an error: the others may never come
        dist.barrier()
    dist.destroy_process_group()


def main_first(action: Callable[[], T], what: str) -> T:
    """`action()`, done by rank 0 while the other ranks wait, then by them: they find what
    rank 0 left (a download, a cache file) instead of writing the same files at the same time.
    If rank 0 fails, the others stop with a message instead of trying too."""
    ranks = current()
    if ranks.world_size == 1:
        return action()
    if ranks.is_main:
        try:
            result = action()
        except BaseException:
            broadcast(False)
            raise
        broadcast(True)
        return result
    if not broadcast(None):
        raise UserError(f"rank 0 failed to {what}; its message says why")
    return action()


def check_lockstep(*generators: torch.Generator) -> None:
    """Raise unless `generators` and PyTorch's own (the CPU's, this GPU's) are in the same
    state on every rank. Every rank drawing the same random numbers is what lets each draw the
    same global batch and augmentation, and a checkpoint keep rank 0's states for all ranks."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    states = [g.get_state() for g in generators] + [torch.get_rng_state()]
    if torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    digest = hashlib.sha256(b"".join(s.numpy().tobytes() for s in states)).digest()
    fingerprint = int.from_bytes(digest[:7], "big")
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    extremes = torch.tensor([fingerprint, -fingerprint], device=device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    if extremes.tolist() != [fingerprint, -fingerprint]:
        raise RuntimeError(
            "the DDP ranks drew different random numbers this epoch, so their batches and "
            "augmentations no longer add up to one process's: a bug, please report it"
        )


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """The model in DDP when a process group is running (gradients averaged), else itself."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None
    )


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over all ranks (the values themselves in a single process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def shard(batch: torch.Tensor, ranks: Ranks) -> torch.Tensor:
    """This rank's contiguous share of a global batch (as equal as the size allows)."""
    return batch.tensor_split(ranks.world_size)[ranks.rank]


def broadcast(value: object) -> object:
    """Rank 0's value of a picklable object, on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
