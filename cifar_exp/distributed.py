"""Several processes, one per GPU, with DistributedDataParallel (`trainer.strategy=ddp`).

Started by torchrun, which gives each process its RANK, LOCAL_RANK and WORLD_SIZE:

    torchrun --nproc_per_node=N -m cifar_exp.train trainer.strategy=ddp

Every rank runs the same program on its share of each batch (`data.batch_size` is the global
batch); DDP averages the gradients, so the update is the one a single process would make on
the whole batch (exactly so when the norm layers do not mix images of a batch, or with
`trainer.sync_batchnorm`). Rank 0 alone writes files and logs to W&B.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("single", "ddp")


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
    if dist.is_initialized():
        dist.destroy_process_group()


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
