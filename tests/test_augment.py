"""The batched augmentation (augment=s9_batched) against the albumentations reference (s9).

Each property is measured on the same images through both shipped configs, with the other
transforms switched off, so a change to either YAML that breaks agreement fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import augment_batch, compose_train
from hydra.utils import instantiate

from cifar_exp.data import datasets
from cifar_exp.data.augment import BatchAugment, Pipeline
from cifar_exp.data.loaders import Batching, TensorLoader

N = 2000  # images per measurement: a rate of 0.5 has a standard error of 0.011


def only(kind: str, keep: str, p: float | None = None):
    """The s9 or s9_batched pipeline with every transform but `keep` (flip|affine|cutout) off."""
    cfg = compose_train(f"augment={kind}")
    if kind == "s9_batched":
        for name in ("flip", "affine", "cutout"):
            if name != keep:
                cfg.augment[f"{name}_p"] = 0.0
        if p is not None:
            cfg.augment[f"{keep}_p"] = p
    else:
        stage = "after_normalize" if keep == "cutout" else "before_normalize"
        index = {"flip": 0, "affine": 1, "cutout": 0}[keep]
        kept = cfg.augment[stage][index]
        if p is not None:
            kept.p = p
        cfg.augment.before_normalize, cfg.augment.after_normalize = [], []
        cfg.augment[stage] = [kept]
    return instantiate(cfg.augment)


def plain(images: np.ndarray) -> torch.Tensor:
    data_cfg = compose_train().data
    return augment_batch(Pipeline(data_cfg.mean, data_cfg.std), images)


@pytest.mark.parametrize("kind", ["s9", "s9_batched"])
def test_flip_rate_is_one_half(kind):
    ramp = np.tile(np.arange(0, 256, 8, dtype=np.uint8)[None, :, None], (32, 1, 3))
    images = np.repeat(ramp[None], N, axis=0)
    out = augment_batch(only(kind, "flip"), images)
    reference = plain(images[:1])[0]
    flipped = [torch.allclose(o, reference.flip(-1), atol=1e-5) for o in out]
    kept = [torch.allclose(o, reference, atol=1e-5) for o in out]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # exactly one of the two
    assert abs(np.mean(flipped) - 0.5) < 0.05


@pytest.mark.parametrize("kind", ["s9", "s9_batched"])
def test_cutout_is_one_mean_filled_square_anywhere_inside(kind):
    images = np.full((N, 32, 32, 3), 255, dtype=np.uint8)  # far from the mean: a hole shows
    out = augment_batch(only(kind, "cutout", p=0.5), images)
    holes = (out == 0).all(dim=1)  # 0 after normalisation is the mean colour
    has_hole = holes.any(dim=(1, 2))
    assert abs(has_hole.float().mean().item() - 0.5) < 0.05
    tops, lefts = [], []
    for hole in holes[has_hole]:
        rows, cols = torch.nonzero(hole.any(1)).flatten(), torch.nonzero(hole.any(0)).flatten()
        assert hole.sum() == 16 * 16 and len(rows) == 16 and len(cols) == 16
        tops.append(rows[0].item())
        lefts.append(cols[0].item())
    assert min(tops) == 0 and max(tops) == 16 and min(lefts) == 0 and max(lefts) == 16


def centroid_shift(kind: str) -> np.ndarray:
    """Movement (x, y) in pixels of a centred blob under shift/scale/rotate alone."""
    y, x = np.mgrid[:32, :32]
    blob = 255 * np.exp(-((x - 15.5) ** 2 + (y - 15.5) ** 2) / 8)
    images = np.repeat(blob.astype(np.uint8)[None, :, :, None], 3, axis=3)
    images = np.repeat(images, 1000, axis=0)
    out = augment_batch(only(kind, "affine", p=1.0), images)
    weight = (out - out.amin(dim=(2, 3), keepdim=True))[:, 0].numpy()
    total = weight.sum(axis=(1, 2))
    cx = (weight * x).sum(axis=(1, 2)) / total - 15.5
    cy = (weight * y).sum(axis=(1, 2)) / total - 15.5
    return np.stack([cx, cy], 1)


def test_shift_distributions_agree():
    """albumentations shifts by int(U(-2, 2)) pixels: -1, 0, 1 with odds 1/4, 1/2, 1/4."""
    for kind in ("s9", "s9_batched"):
        shifts = centroid_shift(kind)
        assert np.allclose(shifts, shifts.round(), atol=0.05)  # whole pixels: no blur
        values, counts = np.unique(shifts.round(), return_counts=True)
        assert values.tolist() == [-1, 0, 1]
        assert np.allclose(counts / counts.sum(), [0.25, 0.5, 0.25], atol=0.04)


def test_batched_augmentation_is_deterministic_under_a_seed():
    transform = instantiate(compose_train().augment)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    first = augment_batch(transform, images, seed=1)
    assert torch.equal(first, augment_batch(transform, images, seed=1))
    assert not torch.equal(first, augment_batch(transform, images, seed=2))


def test_test_time_counterpart_only_normalises():
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    for kind in ("s9", "s9_batched"):
        train_time = instantiate(compose_train(f"augment={kind}").augment)
        test_time = train_time.test_time()
        assert type(test_time) is type(train_time)
        assert torch.allclose(augment_batch(test_time, images), plain(images), atol=1e-6)
        assert not torch.allclose(augment_batch(train_time, images), plain(images), atol=1e-6)


def test_tensor_loader_covers_every_image_once_per_epoch_in_a_new_order():
    images = np.arange(100, dtype=np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    subset = datasets.ImageSet(images, np.arange(100) % 10, tuple("abcdefghij"))
    loader = BatchAugment((0, 0, 0), (1, 1, 1)).loader(
        subset, Batching(batch_size=32, shuffle=True, seed=0, device=torch.device("cpu"))
    )
    assert isinstance(loader, TensorLoader) and len(loader) == 4
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert [len(labels) for _, labels in batches] == [32, 32, 32, 4]
        ids = torch.cat([(x[:, 0, 0, 0] * 255).round().long() for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        assert sorted(ids.tolist()) == list(range(100)) and torch.equal(labels, ids % 10)
        epochs.append(ids)
    assert not torch.equal(*epochs)
