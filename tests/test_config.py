"""Every config option composes, and everything it names instantiates (Hydra's compose API)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CONF, augment_batch, compose_train
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_exp import models
from cifar_exp.train import build_scheduler, call_factory


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_every_group_has_the_options_users_rely_on():
    assert {"sgd", "adamw"} <= set(options("optimizer"))
    assert {"step", "onecycle", "cosine", "plateau"} <= set(options("scheduler"))
    assert {"s9", "s9_batched", "none"} <= set(options("augment"))
    assert {"wandb", "none"} <= set(options("logger"))


def test_defaults_are_the_seed_recipe():
    cfg = compose_train()
    assert (
        cfg.model._target_ == "cifar_exp.models.ConvNet"
        and cfg.model.norm._target_ == "torch.nn.BatchNorm2d"
    )
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum > 0
    assert cfg.scheduler.lr_scheduler._target_.endswith("StepLR")
    assert cfg.scheduler.lr_scheduler.step_size == 23
    assert cfg.trainer.epochs == 50
    assert cfg.logger.mode == "offline"
    assert cfg.trainer.device == "auto"
    assert cfg.data.format == "official" and cfg.data.limit_train is None
    keys = ("seed", "data.root", "data.batch_size", "data.limit_test", "trainer.deterministic")
    for key in keys:  # names that scripts and docs rely on
        assert OmegaConf.select(cfg, key, default="absent") != "absent", key


@pytest.mark.parametrize("name", options("model"))
def test_model_options_build(name):
    model = models.build(compose_train(f"model={name}").model)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


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
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=4)
    assert cfg.scheduler.interval in ("step", "epoch")
    for _ in range(3 * (4 if cfg.scheduler.interval == "step" else 1)):
        optimizer.step()
        scheduler.step(*([1.0] if cfg.scheduler.monitor else []))


@pytest.mark.parametrize("name", options("augment"))
def test_augment_options_give_normalised_tensors(name):
    transform = instantiate(compose_train(f"augment={name}").augment)
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    out = augment_batch(transform, images)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() > -3 and out.max() < 3


def test_s9_augment_is_the_course_pipeline():
    transform = instantiate(compose_train("augment=s9").augment)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["HorizontalFlip", "Affine", "Normalize", "CoarseDropout", "ToTensorV2"]
    dropout = transform.transforms[3]
    assert dropout.num_holes_range == (1, 1) and dropout.hole_height_range == (16, 16)


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


@pytest.mark.parametrize("name", options("logger"))
def test_logger_options_compose(name):
    cfg = compose_train(f"logger={name}")
    assert cfg.logger._target_ == "wandb.init"
    assert cfg.logger.mode in ("offline", "online", "disabled")


def test_debug_smoke_preset_limits_the_run():
    cfg = compose_train("debug=smoke")
    assert cfg.trainer.epochs == 1 and cfg.data.limit_train == 2000


def test_evaluate_config_requires_a_checkpoint():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=["ckpt=x.pt"])
    assert cfg.ckpt == "x.pt" and cfg.data.format == "official"
