"""The training loop: scheduler granularity, checkpoints, seeding."""

from __future__ import annotations

import albumentations as A
import pytest
import torch
import torch.nn.functional as F
from conftest import MEAN, STD, read_metrics
from torch.utils.data import DataLoader, TensorDataset

from cifar_exp import augment, data
from cifar_exp.models import ConvNet
from cifar_exp.runner import (
    EPOCH_METRICS,
    Compute,
    evaluate,
    fit,
    resolve_device,
    seed_everything,
)

CPU = Compute(torch.device("cpu"))
BLOCKS = [{"convs": [8], "transition": {"channels": 16, "type": "strided"}}]


class RecordingTracker:
    """Stands in for the W&B run (checked end to end in test_train.py)."""

    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))


def random_loader(n=64, batch_size=16):
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(n, 3, 32, 32, generator=gen), torch.arange(n) % 10
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size)


def run_fit(tmp_path, scheduler_factory, interval="epoch", monitor=None, epochs=2):
    model = ConvNet(BLOCKS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = scheduler_factory(optimizer)
    tracker = RecordingTracker()
    loader = random_loader()
    history = fit(
        model, optimizer, scheduler, loader, loader,
        epochs=epochs, compute=CPU, run_dir=tmp_path, tracker=tracker,
        scheduler_interval=interval, scheduler_monitor=monitor, progress=False,
    )  # fmt: skip
    return history, scheduler, tracker


def test_onecycle_steps_every_batch(tmp_path):
    history, scheduler, _ = run_fit(
        tmp_path,
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, epochs=2, steps_per_epoch=4),
        interval="step",
    )
    assert scheduler.last_epoch == 2 * 4
    assert history[0]["lr"] != history[1]["lr"]


def test_epoch_schedulers_step_once_per_epoch(tmp_path):
    _, scheduler, _ = run_fit(
        tmp_path, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    )
    assert scheduler.last_epoch == 2
    assert scheduler.get_last_lr() == [pytest.approx(0.025)]


def test_plateau_is_given_the_monitored_metric(tmp_path):
    seen = []

    class Spy(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            seen.append(metrics)
            super().step(metrics)

    history, _, _ = run_fit(tmp_path, Spy, monitor="test_loss")
    assert seen == [m["test_loss"] for m in history]


def test_metrics_tracker_and_checkpoints_agree(tmp_path):
    history, _, tracker = run_fit(tmp_path, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5))
    assert read_metrics(tmp_path) == history
    assert all(tuple(m) == EPOCH_METRICS for m in history)
    assert [step for step, _ in tracker.logged] == [1, 2]
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    assert last["epoch"] == 2
    best_epoch = max(history, key=lambda m: m["test_acc"])["epoch"]
    assert best["epoch"] == best_epoch and best["metrics"] == history[best_epoch - 1]
    assert set(last) >= {"model", "optimizer", "scheduler", "epoch", "best_test_acc"}
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def seeded_history(subset, seed, tmp_path):
    seed_everything(seed, deterministic=True)
    model = ConvNet(BLOCKS, dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    s9 = augment.pipeline(MEAN, STD, before_normalize=[A.HorizontalFlip()])
    loaders = [
        data.make_loader(
            subset, t, batch_size=32, shuffle=s, num_workers=2, seed=seed, device=CPU.device
        )
        for t, s in ((s9, True), (augment.pipeline(MEAN, STD), False))
    ]
    history = fit(
        model, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 5), *loaders,
        epochs=2, compute=CPU, run_dir=tmp_path, tracker=RecordingTracker(),
        progress=False,
    )  # fmt: skip
    torch.use_deterministic_algorithms(False)
    return [(m["train_loss"], m["test_loss"]) for m in history]


def test_test_flip_averages_each_image_with_its_mirror_image():
    torch.manual_seed(0)
    model = ConvNet(BLOCKS).eval()
    loader = random_loader(n=32, batch_size=16)
    images, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
    with torch.no_grad():
        plain, averaged = model(images), (model(images) + model(images.flip(3))) / 2
    for flip, logits in ((False, plain), (True, averaged)):
        loss, predictions, targets = evaluate(model, loader, CPU, flip=flip)
        assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert torch.equal(predictions, logits.argmax(1)) and torch.equal(targets, labels)


def test_same_seed_same_numbers(cifar_root, cache_dir, tmp_path):
    subset = data.load_split(str(cifar_root), "folder", "test", 200, str(cache_dir))
    first = seeded_history(subset, 3, tmp_path / "a")
    assert first == seeded_history(subset, 3, tmp_path / "b")
    assert first != seeded_history(subset, 4, tmp_path / "c")


def test_auto_device_falls_back_in_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"
