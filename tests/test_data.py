"""Finding and loading both data formats (folders and archives), the fixed class-balanced
subsets, the decode cache, the loaders, and the per-machine data location."""

from __future__ import annotations

import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar
from conftest import CONF, MEAN, STD, write_tree
from hydra import compose, initialize_config_dir
from PIL import Image

from cifar_exp.data import datasets
from cifar_exp.data.augment import Pipeline
from cifar_exp.data.datasets import DataNotFoundError, balanced_subset, locate
from cifar_exp.data.loaders import Batching
from cifar_exp.errors import UserError
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


def archive(tree: Path, path: Path, wrap: str = "") -> Path:
    """`tree`'s train/ and test/ in a .tar.gz or .zip at `path`, under the folder `wrap`."""
    files = [f for f in sorted(tree.rglob("*")) if f.is_file()]
    if path.name.endswith(".zip"):
        with zipfile.ZipFile(path, "w") as zipped:
            for f in files:
                zipped.write(f, Path(wrap, f.relative_to(tree)))
    else:
        with tarfile.open(path, "w:gz") as tarred:
            for f in files:
                tarred.add(f, str(Path(wrap, f.relative_to(tree))))
    return path


@pytest.mark.parametrize(("name", "wrap"), [("copy.tar.gz", ""), ("copy.zip", "cifar10")])
def test_an_archive_is_unpacked_once_into_the_cache_and_recognised(tmp_path, name, wrap):
    tree = write_tree(tmp_path / "tree", CATS_AND_DOGS)
    packed = archive(tree, tmp_path / name, wrap)
    root, fmt = locate(str(packed), "auto", str(tmp_path / "cache"))
    (unpacked,) = (tmp_path / "cache").iterdir()  # nothing half-unpacked beside it
    assert fmt == "folder" and root == unpacked / wrap
    marker = root / "train" / "cat" / "0000.png"
    marker.write_bytes(b"changed")  # reused, not unpacked again
    assert locate(str(packed), "folder", str(tmp_path / "cache")) == (root, "folder")
    assert marker.read_bytes() == b"changed"
    loaded = datasets.load_split(str(packed), "auto", "test", None, str(tmp_path / "cache"))
    assert loaded.classes == ("cat", "dog") and len(loaded.labels) == 6


def test_auto_recognises_each_layout_and_a_wrong_choice_names_the_right_one(tmp_path):
    tree = write_tree(tmp_path / "tree", CATS_AND_DOGS)
    write_official_batches(tmp_path / "official")
    assert locate(str(tree), "auto") == (tree, "folder")
    assert locate(str(tmp_path / "official"), "auto") == (tmp_path / "official", "official")
    batches = tmp_path / "official" / "cifar-10-batches-py"
    assert locate(str(batches), "auto") == (tmp_path / "official", "official")
    assert locate(str(tmp_path / "empty"), "auto") == (tmp_path / "empty", "official")  # download
    with pytest.raises(UserError) as err:
        locate(str(tree), "official")
    assert str(err.value) == (
        f"data.root={tree} holds an image tree, not the official files (cifar-10-batches-py/): "
        "use data.format=folder or data.format=auto"
    )
    with pytest.raises(UserError, match="not an image tree: use data.format=official or"):
        locate(str(tmp_path / "official"), "folder")


def test_a_broken_archive_or_a_stray_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / "broken.tar.gz").write_bytes(b"not a tar file")
    with pytest.raises(UserError, match="broken.tar.gz cannot be unpacked .*good copy"):
        locate(str(tmp_path / "broken.tar.gz"), "auto", str(tmp_path / "cache"))
    assert not list((tmp_path / "cache").iterdir())
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataNotFoundError, match="not a .tar.gz, .tgz or .zip"):
        locate(str(tmp_path / "notes.txt"), "auto")


def test_the_data_location_is_set_once_per_machine(tmp_path, monkeypatch):
    """CIFAR_DATA, or data.root in conf/local/default.yaml, for train and evaluate alike; the
    command line wins."""
    conf = shutil.copytree(CONF, tmp_path / "conf")
    shutil.rmtree(conf / "local")  # not this machine's own settings

    def roots(*overrides: str) -> set[str]:
        with initialize_config_dir(str(conf), version_base="1.3"):
            return {
                compose(name, overrides=list(overrides), return_hydra_config=False).data.root
                for name in ("train", "evaluate")
            }

    monkeypatch.delenv("CIFAR_DATA", raising=False)
    assert roots() == {"./data"}
    monkeypatch.setenv("CIFAR_DATA", "/env/cifar")
    assert roots() == {"/env/cifar"}
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("# @package _global_\ndata:\n  root: /mine\n")
    assert roots() == {"/mine"}
    assert roots("data.root=/typed") == {"/typed"}
