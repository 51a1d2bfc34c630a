"""CIFAR-10 as decoded uint8 arrays in memory, from the official files or an image folder tree.

Both formats end as the same `ImageSet`: images (N, 32, 32, 3) uint8 and labels (N,) int64.
Folder trees are decoded once and cached as .npy files, so re-runs do not decode again; within
one process (a Hydra multirun) the arrays are kept in memory.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import os
import pickle
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info
from torchvision.datasets import CIFAR10, ImageFolder

from cifar_exp import distributed
from cifar_exp.augment import BatchAugment
from cifar_exp.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
FORMATS = ("official", "folder")


class DataNotFoundError(UserError):
    """The data set is not where the config says, and could not be fetched."""


@dataclass(frozen=True)
class ImageSet:
    images: np.ndarray  # (N, H, W, 3) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]


def missing_data_message(root: Path, fmt: str, detail: str) -> str:
    return (
        f"No data set at data.root={root} (data.format={fmt}): {detail}\n"
        "Provide CIFAR-10 in one of two ways:\n"
        f"  - data.format=official data.root={root}: downloads the official python batches\n"
        "    into data.root (needs internet; about 170 MB, checked by md5), or put an existing\n"
        "    cifar-10-batches-py/ folder there;\n"
        "  - data.format=folder data.root=<dir>: an image tree\n"
        "    <dir>/{train,test}/<class>/*.png|*.jpg with one folder per class."
    )


def balanced_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` images taken class by class in turn: the same every time.

    The k-th image of every class comes before the (k+1)-th of any, so each class gets
    limit/num_classes images (up to rounding) and a larger limit extends a smaller one.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    if limit <= 0:
        raise UserError(
            f"data.limit_train and data.limit_test must be positive or null, got {limit}"
        )
    order = np.argsort(labels, kind="stable")
    rank_in_class = np.empty(len(labels), dtype=np.int64)
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_class[order] = np.arange(len(labels)) - starts
    chosen = np.lexsort((labels, rank_in_class))[:limit]
    return np.sort(chosen)


def hold_out(train: ImageSet, size: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """Split `size` images off a training set: (the rest, the validation set).

    The validation images are class-balanced (as `balanced_subset`) and drawn in an order
    shuffled by `seed`, so the same seed holds out the same images every time.
    """
    n = len(train.labels)
    if not 0 < size < n:
        raise UserError(
            f"data.val_size={size} must be between 1 and the {n - 1} training images it is "
            "taken from (after data.limit_train); 0 or null: no validation set"
        )
    order = np.random.default_rng(seed).permutation(n)
    val = np.sort(order[balanced_subset(train.labels[order], size)])
    rest = np.setdiff1d(np.arange(n), val)
    return (
        ImageSet(train.images[rest], train.labels[rest], train.classes),
        ImageSet(train.images[val], train.labels[val], train.classes),
    )


def load_official(root: Path, split: str, limit: int | None) -> ImageSet:
    batches = root / CIFAR10.base_folder
    if batches.is_dir():  # present: check it, never download over it
        try:
            ds = CIFAR10(str(root), train=split == "train", download=False)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as err:
            raise UserError(
                f"{batches} is truncated or corrupted (its files fail the md5 check: {err}); "
                f"delete the folder to download it again, or replace it with a good copy"
            ) from None
    else:
        try:
            ds = CIFAR10(str(root), train=split == "train", download=True)
        except (OSError, RuntimeError) as err:  # no network, unreachable mirror, failed md5
            raise DataNotFoundError(
                missing_data_message(root, "official", f"download failed ({err})")
            ) from err
    labels = np.asarray(ds.targets, dtype=np.int64)
    keep = balanced_subset(labels, limit)
    return ImageSet(ds.data[keep], labels[keep], tuple(ds.classes))


def decode(paths: list[str]) -> np.ndarray:
    def read(path: str) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as err:  # unreadable, truncated or not an image
            raise UserError(f"cannot read image {path} ({err}); delete or replace it") from None

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow decodes without the GIL
        return np.stack(list(pool.map(read, paths, chunksize=256)))


def cache_key(paths: list[str]) -> str:
    """Identity of a list of image files: their paths, sizes and modification times."""
    digest = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def load_folder(root: Path, split: str, limit: int | None, cache_dir: Path | None) -> ImageSet:
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataNotFoundError(
            missing_data_message(root, "folder", f"{split_dir} is not a folder")
        )
    try:
        tree = ImageFolder(str(split_dir))  # lists root/<class>/<image> in sorted order
    except FileNotFoundError as err:
        raise DataNotFoundError(missing_data_message(root, "folder", str(err))) from err
    labels = np.asarray(tree.targets, dtype=np.int64)
    keep = balanced_subset(labels, limit)
    paths = [tree.samples[i][0] for i in keep]
    classes = tuple(tree.classes)
    if cache_dir is None:
        return ImageSet(decode(paths), labels[keep], classes)

    cache_file = cache_dir / f"{split}-{len(paths)}-{cache_key(paths)}.npy"
    if cache_file.exists():
        images = np.load(cache_file)
    else:
        log.info("Decoding %d %s images from %s (cached in %s)", len(paths), split, root, cache_dir)
        images = decode(paths)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so an interrupted run leaves no broken cache.
        with tempfile.NamedTemporaryFile(dir=cache_dir, suffix=".tmp", delete=False) as tmp:
            np.save(tmp, images)
        os.replace(tmp.name, cache_file)
    return ImageSet(images, labels[keep], classes)


@functools.lru_cache(maxsize=4)
def load_split(
    root: str, fmt: str, split: str, limit: int | None = None, cache_dir: str | None = None
) -> ImageSet:
    """One split of the data set, decoded; kept in memory for later calls with the same args."""
    if fmt not in FORMATS:
        raise UserError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    root_path = Path(root).expanduser().resolve()
    if fmt == "official":
        return load_official(root_path, split, limit)
    return load_folder(root_path, split, limit, Path(cache_dir).expanduser() if cache_dir else None)


class AugmentedImages(Dataset):
    """uint8 HWC images passed through an albumentations pipeline that ends in a tensor."""

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


class TensorLoader:
    """Batches sliced from a whole split held as one uint8 tensor on the training device.

    Shuffling, slicing and `BatchAugment` run as a few tensor operations per batch: no
    per-image Python and no worker processes. One generator on the device drives the order
    and the augmentation, so a seed fixes both. Yields (images, labels) like a DataLoader.

    Under DDP (`ranks`) every rank draws the same global batch and augments it, then keeps
    its own share: the ranks together see what a single process would.
    """

    def __init__(
        self,
        data: ImageSet,
        augmentation: BatchAugment,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int,
        device: torch.device,
        ranks: distributed.Ranks | None = None,
    ) -> None:
        # NHWC storage seen as NCHW: the layout channels_last wants, at no copy.
        self.images = torch.from_numpy(data.images).to(device).permute(0, 3, 1, 2)
        self.labels = torch.from_numpy(data.labels).to(device)
        self.augmentation, self.batch_size, self.shuffle = augmentation, batch_size, shuffle
        self.generator = torch.Generator(device).manual_seed(seed)
        self.ranks = ranks or distributed.Ranks()

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n, device = len(self.labels), self.labels.device
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=device)
        else:
            order = torch.arange(n, device=device)
        for batch in order.split(self.batch_size):
            images = self.augmentation(self.images[batch], self.generator)
            if self.ranks.world_size > 1:
                share = distributed.shard(torch.arange(len(batch), device=device), self.ranks)
                images, batch = images[share], batch[share]
            yield images, self.labels[batch]


def make_loader(
    data: ImageSet,
    augmentation: Callable,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    device: torch.device,
    num_workers: int,
    ranks: distributed.Ranks | None = None,
) -> TensorLoader | DataLoader:
    """Batches of (normalised images, labels) for the training loop.

    A `BatchAugment` gets a `TensorLoader` (data on `device`, batched augmentation); an
    albumentations pipeline gets a DataLoader that augments image by image in `num_workers`
    worker processes and hands CPU tensors to the loop. With `ranks` (DDP) each rank gets its
    share of every batch of `batch_size` (TensorLoader) or of the data set (a DistributedSampler
    and batch_size / world_size per rank).
    """
    if isinstance(augmentation, BatchAugment):
        return TensorLoader(
            data, augmentation, batch_size=batch_size, shuffle=shuffle, seed=seed, device=device,
            ranks=ranks,
        )  # fmt: skip
    if hasattr(augmentation, "set_random_seed"):
        augmentation.set_random_seed(seed)
    dataset, sampler = AugmentedImages(data, augmentation), None
    if ranks is not None and ranks.world_size > 1:
        sampler = DistributedSampler(
            dataset, ranks.world_size, ranks.rank, shuffle=shuffle, seed=seed
        )
        batch_size, shuffle = batch_size // ranks.world_size, False  # the sampler shuffles
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=shuffle,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,  # workers restart each epoch and draw fresh seeds
        worker_init_fn=reseed_worker_transform if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def seed_epoch(loader: TensorLoader | DataLoader, seed: int, epoch: int) -> None:
    """Seed the epoch's shuffle and augmentation from (seed, epoch) alone.

    Epoch e then draws the same images in the same order with the same augmentation
    whether the run went straight through or was resumed before it.
    """
    epoch_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
    # TensorLoader: the order and the augmentation; DataLoader: the order and worker seeds.
    loader.generator.manual_seed(epoch_seed)
    if isinstance(getattr(loader, "sampler", None), DistributedSampler):
        loader.sampler.set_epoch(epoch)  # DDP: the sampler's order, from its seed and epoch
    if isinstance(loader, DataLoader) and loader.num_workers == 0:
        transform = loader.dataset.transform
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(epoch_seed)


def load(data_cfg: Mapping, split: str) -> ImageSet:
    """The split named by the `data` config group, subset by its limit_<split>."""
    return load_split(
        str(data_cfg["root"]),
        data_cfg["format"],
        split,
        data_cfg[f"limit_{split}"],
        data_cfg.get("cache_dir"),
    )
