"""data.val_size: a seeded, class-balanced hold-out from the training split, scored every epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import data_overrides, read_metrics, run_cli
from test_runner import BLOCKS, CPU, RecordingTracker, random_loader

from cifar_exp import data
from cifar_exp.errors import UserError
from cifar_exp.models import ConvNet
from cifar_exp.runner import EPOCH_METRICS, VAL_METRICS, evaluate, fit


def image_set(per_class=20, classes=10):  # 200 images, numbered by their pixels
    labels = np.repeat(np.arange(classes), per_class)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 32, 32, 3), dtype=np.uint8
    )
    return data.ImageSet(images, labels, tuple(f"c{i}" for i in range(classes)))


def test_hold_out_is_balanced_disjoint_and_seeded():
    full = image_set()
    train, val = data.hold_out(full, 50, seed=0)
    assert len(val.labels) == 50 and len(train.labels) == 150
    assert np.bincount(val.labels).tolist() == [5] * 10
    # the images are numbered by their first pixel: together they are the training set, once
    ids = np.concatenate([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]])
    assert sorted(ids.tolist()) == list(range(200))
    assert (train.labels == full.labels[train.images[:, 0, 0, 0]]).all()
    same = data.hold_out(full, 50, seed=0)[1]
    other = data.hold_out(full, 50, seed=1)[1]
    assert np.array_equal(same.images, val.images)
    assert not np.array_equal(other.images, val.images)
    # not simply the first images of each class
    assert set(val.images[:, 0, 0, 0]) != set(data.balanced_subset(full.labels, 50))


@pytest.mark.parametrize("size", [0, 200, 400])
def test_hold_out_refuses_sizes_that_leave_nothing(size):
    with pytest.raises(UserError, match="data.val_size"):
        data.hold_out(image_set(), size, seed=0)


def test_fit_records_validation_metrics(tmp_path):
    model = ConvNet(BLOCKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 5)
    loader, val_loader = random_loader(), random_loader(n=32)
    history = fit(
        model, optimizer, scheduler, loader, loader, epochs=1, compute=CPU, run_dir=tmp_path,
        tracker=RecordingTracker(), progress=False, val_loader=val_loader,
    )  # fmt: skip
    assert tuple(history[0]) == EPOCH_METRICS + VAL_METRICS
    assert read_metrics(tmp_path) == history
    val_loss, predictions, targets = evaluate(model, val_loader, CPU)
    assert history[0]["val_loss"] == pytest.approx(val_loss)
    assert history[0]["val_acc"] == pytest.approx((predictions == targets).float().mean().item())


def test_cli_reports_and_optimises_the_validation_accuracy(cifar_root, cache_dir, tmp_path):
    proc = run_cli(
        "train",
        *data_overrides(cifar_root, cache_dir, train=300, test=100),
        "data.val_size=100", "trainer.epochs=1", "logger=none", "augment=none",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    (metrics,) = read_metrics(tmp_path)
    assert {"val_loss", "val_acc"} <= set(metrics)
    assert f"best_val_acc: {metrics['val_acc']}" in (tmp_path / "summary.txt").read_text()
    assert "200 training and 100 test images" in proc.stderr + proc.stdout
    assert f"best val_acc {metrics['val_acc']:.4f}" in proc.stderr + proc.stdout


def test_val_metric_without_val_size_is_refused(tmp_path):
    proc = run_cli(
        "train", "optimized_metric=val_acc", "data.root=/nonexistent", f"hydra.run.dir={tmp_path}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "optimized_metric=val_acc is not a metric" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
