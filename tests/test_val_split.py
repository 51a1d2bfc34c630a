"""data.val_size: a seeded, class-balanced hold-out from the training split, scored every epoch."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import (
    CPU,
    TINY_BLOCKS,
    data_overrides,
    make_learner,
    make_record,
    numbered_images,
    random_loader,
    read_metrics,
    run_cli,
)

from cifar_exp.data import datasets
from cifar_exp.data.loaders import Loaders
from cifar_exp.engine import checkpoint
from cifar_exp.engine.inference import predict
from cifar_exp.engine.loop import LoopOptions, fit
from cifar_exp.errors import UserError
from cifar_exp.model.convnet import ConvNet
from cifar_exp.settings import EPOCH_METRICS, VAL_METRICS


def test_hold_out_is_balanced_disjoint_and_seeded():
    full = numbered_images()
    train, val = datasets.hold_out(full, 50, seed=0)
    assert len(val.labels) == 50 and len(train.labels) == 150
    assert np.bincount(val.labels).tolist() == [5] * 10
    # the images are numbered by their first pixel: together they are the training set, once
    ids = np.concatenate([train.images[:, 0, 0, 0], val.images[:, 0, 0, 0]])
    assert sorted(ids.tolist()) == list(range(200))
    assert (train.labels == full.labels[train.images[:, 0, 0, 0]]).all()
    same = datasets.hold_out(full, 50, seed=0)[1]
    other = datasets.hold_out(full, 50, seed=1)[1]
    assert np.array_equal(same.images, val.images)
    assert not np.array_equal(other.images, val.images)
    # not simply the first images of each class
    assert set(val.images[:, 0, 0, 0]) != set(datasets.balanced_subset(full.labels, 50))


@pytest.mark.parametrize("size", [200, 400])
def test_hold_out_refuses_sizes_that_leave_nothing(size):
    with pytest.raises(UserError, match="data.val_size"):
        datasets.hold_out(numbered_images(), size, seed=0)


def test_fit_records_validation_metrics(tmp_path):
    learner = make_learner(ConvNet(TINY_BLOCKS))
    loader, val_loader = random_loader(), random_loader(n=32, seed=1)
    record = make_record(tmp_path, monitor="val_acc", epochs=1)
    fit(learner, Loaders(loader, loader, val_loader), LoopOptions(1, 0, progress=False), record)
    (metrics,) = record.history
    assert tuple(metrics) == EPOCH_METRICS + VAL_METRICS
    assert read_metrics(tmp_path) == record.history
    val_loss, predictions, targets, _ = predict(learner.model, val_loader, CPU)
    assert metrics["val_loss"] == pytest.approx(val_loss)
    assert metrics["val_acc"] == pytest.approx((predictions == targets).float().mean().item())


@pytest.mark.slow
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
    # the validation split, not the test set, chose the model
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["monitor"] == "val_acc" and results["best_val_acc"] == metrics["val_acc"]
    assert checkpoint.load(tmp_path / "checkpoints" / "best.pt")["monitor"]["metric"] == "val_acc"


@pytest.mark.slow
def test_val_metric_without_val_size_is_refused(tmp_path):
    proc = run_cli(
        "train", "optimized_metric=val_acc", "data.root=/nonexistent", f"hydra.run.dir={tmp_path}",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "optimized_metric=val_acc is not a metric" in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr
