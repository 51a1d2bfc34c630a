"""The training loop: when the schedule steps, what each epoch hands the record, seeding,
test-time flips."""

from __future__ import annotations

import albumentations as A
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CPU,
    MEAN,
    STD,
    TINY_BLOCKS,
    make_learner,
    make_record,
    random_loader,
    read_metrics,
)

from cifar_exp.data import datasets
from cifar_exp.data.augment import Pipeline
from cifar_exp.data.loaders import Batching, Loaders
from cifar_exp.engine.compute import resolve_device, seed_everything
from cifar_exp.engine.inference import predict
from cifar_exp.engine.loop import LoopOptions, fit
from cifar_exp.model.convnet import ConvNet
from cifar_exp.settings import EPOCH_METRICS, TrainerSettings, checked


def run_fit(tmp_path, scheduler_factory, interval="epoch", monitor=None, epochs=2):
    learner = make_learner(ConvNet(TINY_BLOCKS), scheduler_factory, interval, monitor)
    record = make_record(tmp_path, epochs=epochs)
    loader = random_loader()
    options = LoopOptions(epochs=epochs, seed=0, progress=False)
    fit(learner, Loaders(loader, loader), options, record)
    return record, learner.schedule.scheduler


def test_onecycle_steps_every_batch(tmp_path):
    record, scheduler = run_fit(
        tmp_path,
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, epochs=2, steps_per_epoch=4),
        interval="step",
    )
    assert scheduler.last_epoch == 2 * 4
    assert record.history[0]["lr"] != record.history[1]["lr"]


def test_epoch_schedulers_step_once_per_epoch(tmp_path):
    _, scheduler = run_fit(
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

    record, _ = run_fit(tmp_path, Spy, monitor="test_loss")
    assert seen == [m["test_loss"] for m in record.history]


def test_every_epoch_reaches_the_record_metrics_file_and_tracker(tmp_path):
    record, _ = run_fit(tmp_path, lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5))
    assert read_metrics(tmp_path) == record.history
    assert all(tuple(m) == EPOCH_METRICS for m in record.history)
    assert [step for step, _ in record.tracker.logged] == [1, 2]


def seeded_history(subset, seed, tmp_path):
    """Two epochs with dropout and flips by albumentations in 2 DataLoader workers."""
    seed_everything(seed, deterministic=True)
    learner = make_learner(ConvNet(TINY_BLOCKS, dropout=0.1), lr=0.05)
    loaders = Loaders(
        Pipeline(MEAN, STD, before_normalize=[A.HorizontalFlip()]).loader(
            subset, Batching(32, seed, CPU.device, shuffle=True, num_workers=2)
        ),
        Pipeline(MEAN, STD).loader(subset, Batching(32, seed, CPU.device)),
    )  # fmt: skip
    record = make_record(tmp_path)
    fit(learner, loaders, LoopOptions(epochs=2, seed=seed, progress=False), record)
    torch.use_deterministic_algorithms(False)
    return [(m["train_loss"], m["test_loss"]) for m in record.history]


def test_same_seed_same_numbers(cifar_root, cache_dir, tmp_path):
    subset = datasets.load_split(str(cifar_root), "folder", "test", 200, str(cache_dir))
    first = seeded_history(subset, 3, tmp_path / "a")
    assert first == seeded_history(subset, 3, tmp_path / "b")
    assert first != seeded_history(subset, 4, tmp_path / "c")


def test_tta_averages_the_logits_of_the_stated_views():
    torch.manual_seed(0)
    model = ConvNet(TINY_BLOCKS).eval()
    loader = random_loader(n=32, batch_size=16)
    images, labels = (torch.cat(parts) for parts in zip(*loader, strict=True))
    mirrored = images.flip(3)
    # One pixel down and right: row/column 1 of the padded image is row/column 0 of the image,
    # and the new first row/column is the reflected second one.
    down_right = [torch.cat([x[..., 1:2, :], x[..., :-1, :]], 2) for x in (images, mirrored)]
    down_right = [torch.cat([x[..., :, 1:2], x[..., :, :-1]], 3) for x in down_right]
    up_left = [torch.cat([x[..., 1:, :], x[..., -2:-1, :]], 2) for x in (images, mirrored)]
    up_left = [torch.cat([x[..., :, 1:], x[..., :, -2:-1]], 3) for x in up_left]
    with torch.no_grad():
        expected = {
            "none": model(images),
            "flip": (model(images) + model(mirrored)) / 2,
            "multi": sum(model(x) for x in (images, mirrored, *down_right, *up_left)) / 6,
        }
    assert not torch.allclose(expected["flip"], expected["multi"])
    for tta, logits in expected.items():
        loss, predictions, targets, confidence = predict(model, loader, CPU, tta=tta)
        assert loss == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
        assert torch.equal(predictions, logits.argmax(1)) and torch.equal(targets, labels)
        assert torch.allclose(confidence, logits.softmax(1).max(1).values, rtol=1e-5)


def test_old_test_flip_key_means_tta_flip():
    assert checked(TrainerSettings, {"epochs": 1, "test_flip": True}).tta == "flip"
    assert checked(TrainerSettings, {"epochs": 1, "test_flip": False}).tta == "none"
    assert checked(TrainerSettings, {"epochs": 1, "tta": "multi", "test_flip": True}).tta == "multi"


def test_batches_are_normalised_by_the_data_set_statistics():
    loader = random_loader(n=16, batch_size=16)
    (images, _), *_ = loader
    raw = loader.images.float() / 255
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(images, (raw - mean) / std)


def test_auto_device_falls_back_in_order(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"
    assert resolve_device("cpu").type == "cpu"
