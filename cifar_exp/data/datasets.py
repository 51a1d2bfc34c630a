"""CIFAR-10 as decoded uint8 arrays in memory, from the official files or an image folder tree.

`locate` finds what `data.root` holds: the official files' folder, an image folder tree, or a
.tar.gz/.tgz/.zip of either (unpacked once into the cache folder and reused); `data.format=auto`
takes what it finds, and an explicit format that does not match is refused with the fix.
Both formats end as the same `ImageSet`: images (N, 32, 32, 3) uint8 and labels (N,) int64.
Folder trees are decoded once and cached as .npy files, so re-runs do not decode again; within
one process (a Hydra multirun) the arrays are kept in memory.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder

from cifar_exp import distributed, files
from cifar_exp.errors import UserError
from cifar_exp.settings import DataSettings

log = logging.getLogger(__name__)


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
        "Provide CIFAR-10 in one of these ways (data.format=auto recognises each):\n"
        f"  - data.root={root}: the official python batches are downloaded there\n"
        "    (needs internet; about 170 MB, checked by md5), or put an existing\n"
        "    cifar-10-batches-py/ folder there (data.format=official);\n"
        "  - data.root=<dir>: an image tree <dir>/{train,test}/<class>/*.png|*.jpg with one\n"
        "    folder per class (data.format=folder);\n"
        "  - data.root=<file>.tar.gz|.tgz|.zip: an archive of either, unpacked once into\n"
        "    the cache folder and reused.\n"
        "Set it once per machine: CIFAR_DATA=<path>, or data.root in conf/local/default.yaml."
    )


ARCHIVES = (".tar.gz", ".tgz", ".zip")
# Where archives are unpacked when data.cache_dir is null (the default cache_dir too).
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cifar_exp"
KINDS = {"official": f"the official files ({CIFAR10.base_folder}/)", "folder": "an image tree"}


def unpacked(archive: Path, cache_dir: Path) -> Path:
    """The archive's contents, unpacked once into cache_dir/<name>-<size bytes> and reused."""
    stem = next(archive.name[: -len(s)] for s in ARCHIVES if archive.name.endswith(s))
    target = cache_dir / f"{stem}-{archive.stat().st_size}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=cache_dir, prefix="unpacking-"))
    log.info("Unpacking %s into %s (once)", archive, target)
    try:
        if archive.name.endswith(".zip"):
            with zipfile.ZipFile(archive) as zipped:
                zipped.extractall(partial)  # zipfile keeps every member inside `partial`
        else:
            with tarfile.open(archive) as tarred:
                tarred.extractall(partial, filter="data")  # no links or paths out of it
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as err:
        shutil.rmtree(partial, ignore_errors=True)
        raise UserError(
            f"data.root={archive} cannot be unpacked ({' '.join(str(err).split())}); replace "
            "it with a good copy"
        ) from None
    try:
        os.rename(partial, target)  # all or nothing: an interrupted unpack is never used
    except OSError:  # another process (a sweep job) unpacked it first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    return target


def detect(folder: Path) -> tuple[Path, str] | None:
    """Where in `folder` CIFAR-10 is and in which format: the folder itself, or the single
    folder it wraps (as archives often do); None if neither holds a recognised layout."""
    if not folder.is_dir():
        return None
    if (folder / "train").is_dir():
        return folder, "folder"
    if (folder / CIFAR10.base_folder).is_dir():
        return folder, "official"
    if folder.name == CIFAR10.base_folder:
        return folder.parent, "official"
    children = [c for c in folder.iterdir() if c.is_dir()]
    return detect(children[0]) if len(children) == 1 else None


def locate(root: str, fmt: str, cache_dir: str | None = None) -> tuple[Path, str]:
    """The folder to read and its format, for `data.root` and `data.format` (auto: what
    the folder holds; the official download where it holds nothing recognised)."""
    path = Path(root).expanduser().resolve()
    if path.is_file():
        if not path.name.endswith(ARCHIVES):
            raise DataNotFoundError(
                missing_data_message(path, fmt, "a file that is not a .tar.gz, .tgz or .zip")
            )
        folder = unpacked(path, Path(cache_dir).expanduser() if cache_dir else CACHE)
        found = detect(folder)
        if found is None:
            raise DataNotFoundError(
                missing_data_message(path, fmt, f"its contents ({folder}) hold neither layout")
            )
    else:
        found = detect(path)
    if found is None:
        return path, "official" if fmt == "auto" else fmt
    if fmt not in ("auto", found[1]):
        raise UserError(
            f"data.root={root} holds {KINDS[found[1]]}, not {KINDS[fmt]}: use "
            f"data.format={found[1]} or data.format=auto"
        )
    return found


def balanced_subset(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices of the first `limit` images taken class by class in turn: the same every time.

    The k-th image of every class comes before the (k+1)-th of any, so each class gets
    limit/num_classes images (up to rounding) and a larger limit extends a smaller one.
    """
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
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
    if size >= n:
        raise UserError(
            f"data.val_size={size} leaves no training images: the data has {n} (after "
            "data.limit_train); hold out fewer, or 0 or null for no validation set"
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
    """The images as one uint8 array, in RGB whatever their mode (grey, palette, RGBA); an
    image that cannot be read, or whose size differs from the others', is refused by name."""

    def read(path: str) -> np.ndarray:
        try:
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
        except OSError as err:  # unreadable, truncated, not an image, a broken link
            raise UserError(f"cannot read image {path} ({err}); delete or replace it") from None

    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # Pillow decodes without the GIL
        images = list(pool.map(read, paths, chunksize=256))
    shapes = Counter(image.shape for image in images)
    if len(shapes) > 1:
        usual = shapes.most_common(1)[0][0]
        odd = next(i for i, image in enumerate(images) if image.shape != usual)
        height, width, _ = images[odd].shape
        raise UserError(
            f"image {paths[odd]} is {width}x{height} pixels, but the other images are "
            f"{usual[1]}x{usual[0]} (in all, {len(images) - shapes[usual]} of another size); "
            "resize those images or move them out of the data folder"
        )
    return np.stack(images)


class ClassFolders(ImageFolder):
    """ImageFolder, less the hidden folders (.ipynb_checkpoints, .cache) it would take for
    classes; files without an image extension are skipped as ImageFolder does."""

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = sorted(
            entry.name for entry in os.scandir(directory)
            if entry.is_dir() and not entry.name.startswith(".")
        )  # fmt: skip
        if not classes:
            raise FileNotFoundError(f"no class folders in {directory}")
        return classes, {name: i for i, name in enumerate(classes)}


def read_cache(path: Path) -> np.ndarray | None:
    """Decoded images cached by an earlier run; None (and a warning) if damaged."""
    if not path.is_file():
        return None
    try:
        return np.load(path)
    except (OSError, ValueError, EOFError) as err:
        log.warning(
            "The decoded-image cache %s is damaged (%s); decoding the images again", path, err
        )
        return None


def write_cache(path: Path, images: np.ndarray) -> None:
    """Cache decoded images for later runs; a cache that cannot be written is only a warning."""
    buffer = io.BytesIO()
    np.save(buffer, images)
    try:
        files.write_atomically(path, buffer.getbuffer(), shared=True)
    except files.WriteFailed as err:
        log.warning("The decoded images are not cached: %s", err)


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
        tree = ClassFolders(str(split_dir))  # lists root/<class>/<image> in sorted order
    except FileNotFoundError as err:
        raise DataNotFoundError(missing_data_message(root, "folder", str(err))) from err
    labels = np.asarray(tree.targets, dtype=np.int64)
    keep = balanced_subset(labels, limit)
    paths = [tree.samples[i][0] for i in keep]
    classes = tuple(tree.classes)
    if cache_dir is None:
        return ImageSet(decode(paths), labels[keep], classes)

    cache_file = cache_dir / f"{split}-{len(paths)}-{cache_key(paths)}.npy"
    images = read_cache(cache_file)
    if images is None:
        log.info("Decoding %d %s images from %s (cached in %s)", len(paths), split, root, cache_dir)
        images = decode(paths)
        write_cache(cache_file, images)
    return ImageSet(images, labels[keep], classes)


@functools.lru_cache(maxsize=4)
def load_split(
    root: str, fmt: str, split: str, limit: int | None = None, cache_dir: str | None = None
) -> ImageSet:
    """One split of the data set, decoded; kept in memory for later calls with the same args."""
    root_path, fmt = locate(root, fmt, cache_dir)
    if fmt == "official":
        return load_official(root_path, split, limit)
    return load_folder(root_path, split, limit, Path(cache_dir).expanduser() if cache_dir else None)


def read(settings: DataSettings, split: str) -> ImageSet:
    """The split named by the `data` settings, subset by its limit_<split>, read by this
    process alone (evaluate; a DDP run's rank 0 at its end, when the others are done)."""
    limit = settings.limit_train if split == "train" else settings.limit_test
    return load_split(settings.root, settings.format, split, limit, settings.cache_dir)


def load(settings: DataSettings, split: str) -> ImageSet:
    """The split named by the `data` settings (`read`), by every rank of a run.

    Under DDP rank 0 loads first (downloading or decoding into the cache) while the others
    wait, then they read what it left: no two processes write the same files at once.
    """
    return distributed.main_first(lambda: read(settings, split), f"load the {split} images")
