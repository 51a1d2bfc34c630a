"""Every config option composes, and everything it names instantiates (Hydra's compose API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF, augment_batch, compose_train, run_cli
from hydra.utils import instantiate

from cifar_exp.engine import preflight
from cifar_exp.engine.compute import resolve_device
from cifar_exp.engine.learner import Schedule
from cifar_exp.settings import call_factory


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_defaults_are_the_seed_recipe():
    """The seed's choices (../shared/seed/README.md) as the composed, checked config gives
    them to the code."""
    cfg = compose_train()
    settings = preflight.check(cfg)
    model = instantiate(cfg.model)
    assert isinstance(model.features[0][2], torch.nn.BatchNorm2d)
    optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] > 0
    schedule = Schedule.from_config(cfg.scheduler, optimizer, steps_per_epoch=10)
    assert isinstance(schedule.scheduler, torch.optim.lr_scheduler.StepLR)
    assert schedule.scheduler.step_size == 23 and schedule.interval == "epoch"
    assert settings.trainer.epochs == 50
    assert resolve_device(settings.trainer.device) == torch.device("cpu")
    assert settings.data.format == "auto" and settings.data.limit_train is None
    assert settings.trainer.monitor == settings.optimized_metric == "test_acc"


@pytest.mark.parametrize("name", options("optimizer"))
def test_optimizer_options_build(name):
    cfg = compose_train(f"optimizer={name}")
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = call_factory("optimizer", instantiate(cfg.optimizer), params)
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


@pytest.mark.parametrize("name", options("scheduler"))
def test_scheduler_options_build_and_step(name):
    cfg = compose_train(f"scheduler={name}", "trainer.epochs=3")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    schedule = Schedule.from_config(cfg.scheduler, optimizer, steps_per_epoch=4)
    for _ in range(3):
        for _ in range(4):
            optimizer.step()
            schedule.after_step()
        schedule.after_epoch({"test_loss": 1.0})
    steps = 3 * 4 if schedule.interval == "step" else 3
    assert schedule.scheduler.last_epoch == steps


@pytest.mark.parametrize("name", options("augment"))
def test_augment_options_give_normalised_tensors(name):
    transform = instantiate(compose_train(f"augment={name}").augment)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = augment_batch(transform, images)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() > -3 and out.max() < 3


def test_s9_cutout_hole_is_filled_with_the_data_set_mean():
    """Fill 0 after normalisation: the hole's pixels are the mean colour, i.e. exactly 0."""
    cfg = compose_train("augment=s9")
    cfg.augment.before_normalize = []
    cfg.augment.after_normalize[0].p = 1.0
    transform = instantiate(cfg.augment)
    image = np.full((32, 32, 3), 255, dtype=np.uint8)  # far from the mean everywhere
    out = transform(image=image)["image"]
    hole = (out == 0).all(dim=0)
    assert hole.sum() == 16 * 16


@pytest.mark.slow
def test_debug_smoke_preset_trains_one_epoch_on_a_subset(cifar_root, cache_dir, tmp_path):
    proc = run_cli(
        "train", "debug=smoke", f"data.root={cifar_root}", "data.format=folder",
        f"data.cache_dir={cache_dir}", "logger=none", "trainer.progress=false",
        f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    assert "2000 training and 1000 test images" in proc.stdout + proc.stderr
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


@pytest.mark.slow
def test_evaluate_needs_a_checkpoint(tmp_path):
    proc = run_cli("evaluate", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "Missing mandatory value: ckpt" in proc.stdout + proc.stderr
