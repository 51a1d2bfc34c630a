"""The one gate before any work: every value the code branches on, indexes with or hands to
a library that would fail late, checked before distributed set-up, before any checkpoint is
read and before any data is loaded. `check` returns the checked values, typed.

Hydra already refuses unknown groups, options and keys; `settings` checks the values and the
rules across them. Here come the checks that need the machine (the device, the processes
torchrun started) or the configured objects: the scheduler is stepped through a run of the
configured length on a stand-in optimizer, and the augmentation is checked against the image
size.
"""

from __future__ import annotations

import math
import os

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from cifar_exp.engine.compute import device_problem, resolve_device
from cifar_exp.engine.learner import Schedule
from cifar_exp.errors import UserError, require
from cifar_exp.settings import Settings, checked, config_error


def check(cfg: DictConfig) -> Settings:
    """The training config's values, checked and typed; a UserError naming what is at fault."""
    settings = checked(Settings, cfg)
    if settings.logger.get("tensorboard"):
        require("tensorboard", "tensorboard", "logger.tensorboard=true (or logger=tensorboard)")
    if problems := machine_problems(settings):
        raise config_error(problems)
    check_schedule(
        cfg.scheduler, settings.trainer.epochs, settings.param_groups.norm_and_bias.lr_scale
    )
    instantiate(cfg.augment).check(settings.data.image_size)
    return settings


def machine_problems(settings: Settings) -> list[str]:
    """What this machine cannot run: a device it lacks, DDP without torchrun's processes."""
    trainer = settings.trainer
    problems = [p for p in [device_problem("trainer.device", trainer.device)] if p]
    if trainer.strategy != "ddp":
        return problems
    world_size = os.environ.get("WORLD_SIZE")
    if world_size is None:
        problems.append(
            "trainer.strategy=ddp needs one process per device, started by torchrun: "
            "torchrun --nproc_per_node=<N> -m cifar_exp.train trainer.strategy=ddp ..."
        )
    elif settings.data.batch_size % int(world_size):
        problems.append(
            f"data.batch_size={settings.data.batch_size} is the batch of all {world_size} "
            "processes together; make it a multiple of their number"
        )
    if trainer.sync_batchnorm and resolve_device(trainer.device).type != "cuda":
        problems.append(
            "trainer.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm runs on "
            "GPUs only); on the CPU use trainer.sync_batchnorm=false or a batch-independent "
            "norm such as model/norm=group"
        )
    return problems


def check_schedule(scheduler_cfg: DictConfig, epochs: int, lr_scale: float = 1.0) -> None:
    """Step the configured scheduler through a run of `epochs` epochs (of one step each) on a
    stand-in optimizer: arguments it rejects, or a run longer than it can schedule (OneCycle
    over fewer epochs), fail here rather than mid-run. So does a scheduler that gives every
    parameter group one learning rate (OneCycle's max_lr) when the norm-and-bias group asks
    for its own (`lr_scale`)."""
    weight, norm_and_bias = (torch.zeros(1, requires_grad=True) for _ in range(2))
    groups = [{"params": [weight]}, {"params": [norm_and_bias], "lr": 0.1 * lr_scale}]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    schedule = Schedule.from_config(scheduler_cfg, optimizer, steps_per_epoch=1)
    try:
        for _ in range(epochs):
            optimizer.step()
            schedule.after_step()
            schedule.after_epoch({schedule.monitor: 0.0})
    except (ValueError, ZeroDivisionError) as err:
        raise UserError(
            f"scheduler.lr_scheduler cannot schedule trainer.epochs={epochs} epochs ({err}); "
            "change its arguments or the number of epochs"
        ) from None
    peaks = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    if not math.isclose(peaks[1], peaks[0] * lr_scale):
        raise UserError(
            f"scheduler.lr_scheduler ({scheduler_cfg.lr_scheduler._target_}) sets one learning "
            f"rate for every parameter group, so param_groups.norm_and_bias.lr_scale={lr_scale} "
            "would have no effect; use scheduler=linear, step or cosine, or lr_scale=1"
        )
