"""Batches for the training loop, in two kinds that an augmentation picks (augment.py):

`TensorLoader`: a whole split held as one uint8 tensor on the training device, batches sliced
and augmented as tensor operations; `WorkerLoader`: a DataLoader whose workers augment image
by image. Each seeds its own epochs (`seed_epoch`), so a resumed run repeats them exactly, and
both draw an epoch's images in the same way (`epoch_size`, `epoch_order`).
"""

from __future__ import annotations

import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from cifar_exp import distributed
from cifar_exp.data.datasets import ImageSet
from cifar_exp.errors import UserError


class Loader(Protocol):
    """What the training loop needs of a loader: batches, their number, per-epoch seeding."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def seed_epoch(self, seed: int, epoch: int) -> None: ...


@dataclass
class Loaders:
    train: Loader
    test: Loader
    val: Loader | None = None  # images held out of the training set (data.val_size)


@dataclass(frozen=True)
class Batching:
    """How a loader of either kind draws its batches."""

    batch_size: int  # the global batch: under DDP, shared out among the ranks
    seed: int  # the order and augmentation until `seed_epoch` sets an epoch's own
    device: torch.device  # the training device
    shuffle: bool = False
    num_workers: int = 0  # a WorkerLoader's processes (a TensorLoader slices on its device)
    ranks: distributed.Ranks = distributed.Ranks()  # this process's share of every batch
    last_batch: str = "keep"  # what becomes of the last partial batch (`epoch_size`)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for epoch `epoch` that depends on (seed, epoch) alone.

    Epoch e then draws the same images in the same order with the same augmentation whether
    the run went straight through or was resumed before it.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def epoch_size(n: int, batch_size: int, last_batch: str = "keep", world_size: int = 1) -> int:
    """How many images an epoch over `n` draws, by what becomes of the last partial batch:
    `keep` it; `fill` it to a whole batch with the epoch's first images again (the static
    shapes torch.compile wants, and the same number of steps); `drop` it.

    Under DDP (`world_size` > 1) a kept partial batch is cut to a multiple of the ranks, so
    every rank gets an equal share of every batch (DDP's average of the ranks' mean losses is
    then the batch's mean loss), and never an empty one (a NaN loss).
    """
    partial = n % batch_size
    size = {
        "keep": n - partial % world_size,
        "fill": n + (batch_size - partial) % batch_size,
        "drop": n - partial,
    }[last_batch]
    if size == 0:
        raise UserError(
            f"{n} training images make no batch with data.batch_size={batch_size} and "
            f"data.last_batch={last_batch}; use a smaller batch or more images"
        )
    return size


def epoch_order(n: int, size: int, generator: torch.Generator, shuffle: bool) -> torch.Tensor:
    """The `size` image indices of an epoch, in batch order: the n images shuffled by
    `generator` (or in order), repeated from the start up to `size` or cut to it."""
    device = generator.device
    if shuffle:
        order = torch.randperm(n, generator=generator, device=device)
    else:
        order = torch.arange(n, device=device)
    return order.repeat(-(-size // n))[:size]


class TensorLoader:
    """Batches sliced from a whole split held as one uint8 tensor on the training device.

    Shuffling, slicing and the batched augmentation run as a few tensor operations per batch:
    no per-image Python and no worker processes. One generator on the device drives the order
    and the augmentation, so a seed fixes both. Yields (images, labels) like a DataLoader.

    Under DDP (`ranks`) every rank draws the same global batch and augments it, then keeps
    its own share: the ranks together see what a single process would. That rests on every
    rank drawing the same random numbers, which is checked after every epoch.
    """

    def __init__(
        self,
        data: ImageSet,
        augmentation: Callable[[torch.Tensor, torch.Generator, torch.Tensor, int], torch.Tensor],
        batching: Batching,
    ) -> None:
        device = batching.device
        # NHWC storage seen as NCHW: the layout channels_last wants, at no copy.
        self.images = torch.from_numpy(data.images).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.augmentation, self.batch_size = augmentation, batching.batch_size
        self.shuffle, self.ranks = batching.shuffle, batching.ranks
        self.generator = torch.Generator(device).manual_seed(batching.seed)
        self.size = epoch_size(
            len(self.labels), self.batch_size, batching.last_batch, self.ranks.world_size
        )
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.size / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = epoch_order(len(self.labels), self.size, self.generator, self.shuffle)
        for batch in order.split(self.batch_size):
            images = self.augmentation(self.images[batch], self.generator, batch, self.epoch)
            if self.ranks.world_size > 1:
                share = distributed.shard(torch.arange(len(batch), device=batch.device), self.ranks)
                images, batch = images[share], batch[share]
            yield images, self.labels[batch]
        if self.ranks.world_size > 1:
            distributed.check_lockstep(self.generator)

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """The epoch's order and augmentation, from (seed, epoch)."""
        self.generator.manual_seed(epoch_seed(seed, epoch))
        self.epoch = epoch


class AugmentedImages(Dataset):
    """uint8 HWC images passed through a per-image pipeline that ends in a tensor."""

    def __init__(self, data: ImageSet, transform: Callable) -> None:
        self.data = data
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(image=self.data.images[i])["image"], int(self.data.labels[i])


def reseed_worker_transform(worker_id: int) -> None:
    """Give each worker's copy of the pipeline its own stream, drawn from the loader's seed.

    albumentations keeps its own random state, which forked workers would otherwise share.
    Workers ignore Ctrl-C: the main process stops training after the current step.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    info = get_worker_info()
    info.dataset.transform.set_random_seed(info.seed % 2**32)


class EpochSampler(Sampler[int]):
    """This rank's indices of an epoch (`epoch_order`): every world_size-th, from its rank on,
    so that each global batch is shared out among the ranks."""

    def __init__(
        self, n: int, size: int, generator: torch.Generator, shuffle: bool, ranks: distributed.Ranks
    ) -> None:
        self.n, self.size, self.generator, self.shuffle = n, size, generator, shuffle
        self.ranks = ranks

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.n, self.size, self.generator, self.shuffle)
        yield from order[self.ranks.rank :: self.ranks.world_size].tolist()

    def __len__(self) -> int:
        return self.size // self.ranks.world_size


class WorkerLoader(DataLoader):
    """A DataLoader over images augmented one by one (`transform`, with `set_random_seed`) in
    `num_workers` worker processes; it hands CPU tensors to the loop.

    Under DDP (`ranks`) each rank loads its share of every global batch (batch_size /
    world_size images).
    """

    def __init__(
        self,
        data: ImageSet,
        transform: Callable,
        batching: Batching,
    ) -> None:
        transform.set_random_seed(batching.seed)
        dataset = AugmentedImages(data, transform)
        ranks, workers = batching.ranks, batching.num_workers
        # One generator for the order and the workers' seeds, as a shuffling DataLoader has.
        generator = torch.Generator().manual_seed(batching.seed)
        size = epoch_size(len(dataset), batching.batch_size, batching.last_batch, ranks.world_size)
        super().__init__(
            dataset,
            batch_size=batching.batch_size // ranks.world_size,
            sampler=EpochSampler(len(dataset), size, generator, batching.shuffle, ranks),
            num_workers=workers,
            pin_memory=batching.device.type == "cuda",
            persistent_workers=False,  # workers restart each epoch and draw fresh seeds
            worker_init_fn=reseed_worker_transform if workers > 0 else None,
            generator=generator,
        )

    def seed_epoch(self, seed: int, epoch: int) -> None:
        """The epoch's order and the workers' seeds (or, with no workers, the pipeline's
        stream), from (seed, epoch)."""
        this_epoch = epoch_seed(seed, epoch)
        self.generator.manual_seed(this_epoch)
        if self.num_workers == 0:
            self.dataset.transform.set_random_seed(this_epoch)
