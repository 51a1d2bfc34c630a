"""Loading both data formats, the fixed class-balanced subsets, the decode cache, the loaders."""

from __future__ import annotations

import pickle

import albumentations as A
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from conftest import MEAN, STD, write_tree
from PIL import Image

from cifar_exp.data import datasets
from cifar_exp.data.augment import Pipeline
from cifar_exp.data.datasets import DataNotFoundError, balanced_subset
from cifar_exp.data.loaders import Batching
from cifar_exp.settings import FORMATS

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def test_balanced_subset_is_balanced_fixed_and_nested():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    small, large = balanced_subset(labels, 200), balanced_subset(labels, 400)
    assert np.bincount(labels[small], minlength=10).tolist() == [20] * 10
    assert np.array_equal(small, balanced_subset(labels, 200))
    assert set(small) <= set(large)
    assert np.array_equal(balanced_subset(labels, None), np.arange(5000))


def test_balanced_subset_takes_each_class_in_file_order():
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert balanced_subset(labels, 4).tolist() == [0, 1, 3, 4]


CATS_AND_DOGS = {split: ["cat", "dog"] for split in ("train", "test")}


def test_folder_format_decodes_any_ten_or_fewer_class_tree(tmp_path):
    write_tree(tmp_path, CATS_AND_DOGS)
    loaded = datasets.load_folder(tmp_path, "train", None, cache_dir=None)
    assert loaded.classes == ("cat", "dog")
    assert loaded.images.shape == (6, 32, 32, 3) and loaded.images.dtype == np.uint8
    assert loaded.labels.tolist() == [0, 0, 0, 1, 1, 1]
    first = np.asarray(Image.open(tmp_path / "train" / "cat" / "0000.png"))
    assert np.array_equal(loaded.images[0], first)  # PNG is lossless: exact pixels


def test_folder_decode_is_cached_between_runs(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree", CATS_AND_DOGS)
    cache = tmp_path / "cache"
    first = datasets.load_folder(tmp_path / "tree", "test", 4, cache)
    assert len(list(cache.glob("*.npy"))) == 1

    def no_decoding(paths):
        raise AssertionError("decoded again although the cache holds these images")

    monkeypatch.setattr(datasets, "decode", no_decoding)
    again = datasets.load_folder(tmp_path / "tree", "test", 4, cache)
    assert np.array_equal(first.images, again.images)
    assert np.array_equal(first.labels, again.labels)


def test_folder_cache_notices_changed_files(tmp_path):
    write_tree(tmp_path / "tree", CATS_AND_DOGS)
    cache = tmp_path / "cache"
    datasets.load_folder(tmp_path / "tree", "test", None, cache)
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "tree" / "test" / "cat" / "0000.png")
    reloaded = datasets.load_folder(tmp_path / "tree", "test", None, cache)
    assert reloaded.images[0, 0, 0].tolist() == [1, 2, 3]


def test_shared_copy_loads_as_a_fixed_balanced_subset(cifar_root, cache_dir):
    loaded = datasets.load_split(str(cifar_root), "folder", "test", 100, str(cache_dir))
    assert loaded.classes == CIFAR10_CLASSES
    assert loaded.images.shape == (100, 32, 32, 3)
    assert np.bincount(loaded.labels).tolist() == [10] * 10
    # the first test image of each class, in the official order
    airplane0 = np.asarray(Image.open(cifar_root / "test" / "airplane" / "0000.jpg").convert("RGB"))
    assert np.array_equal(loaded.images[0], airplane0)


def write_official_batches(root, per_batch=20):
    """Files laid out as torchvision's CIFAR10 expects them (its md5 check is patched out)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            "labels": [i % 10 for i in range(per_batch)],
        }
        (folder / name).write_bytes(pickle.dumps(batch))
        batches[name] = batch
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": list(CIFAR10_CLASSES)}))
    return batches


def test_official_format_reads_the_python_batches(tmp_path, monkeypatch):
    batches = write_official_batches(tmp_path)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)
    loaded = datasets.load_official(tmp_path, "test", 10)
    assert loaded.classes == CIFAR10_CLASSES
    assert loaded.labels.tolist() == list(range(10))
    expected = batches["test_batch"]["data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(loaded.images[0], expected)
    assert len(datasets.load_official(tmp_path, "train", None).labels) == 100


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_data_names_the_root_and_both_ways_to_provide_it(tmp_path, monkeypatch, fmt):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    # never download 170 MB from a test, even on a machine with a network
    monkeypatch.setattr(torchvision.datasets.cifar.CIFAR10, "download", offline)
    with pytest.raises(DataNotFoundError) as err:
        datasets.load_split(str(tmp_path / "nowhere"), fmt, "train")
    message = str(err.value)
    assert f"data.root={tmp_path / 'nowhere'}" in message
    assert "data.format=official" in message and "data.format=folder" in message


def flip_flags(subset, seed, batches=2):
    """Per image of the first batches: was it flipped? One batch comes from each worker."""
    loader = Pipeline(MEAN, STD, before_normalize=[A.HorizontalFlip(p=0.5)]).loader(
        subset,
        Batching(
            batch_size=16, shuffle=False, num_workers=2, seed=seed, device=torch.device("cpu")
        ),
    )
    plain = Pipeline(MEAN, STD)
    flags = []
    for b, (images, _) in zip(range(batches), loader, strict=False):
        for j, image in enumerate(images):
            original = plain(image=subset.images[16 * b + j])["image"]
            flags.append(not torch.equal(image, original))
    return flags


def test_augmentation_is_seeded_and_differs_between_workers(cifar_root, cache_dir):
    subset = datasets.load_split(str(cifar_root), "folder", "test", 200, str(cache_dir))
    flags = flip_flags(subset, seed=0)
    assert flags == flip_flags(subset, seed=0)
    assert flags != flip_flags(subset, seed=1)
    assert flags[:16] != flags[16:]  # the two workers draw different streams
    assert 8 <= sum(flags) <= 24  # about half flipped
