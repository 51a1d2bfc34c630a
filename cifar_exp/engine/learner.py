"""What the loop trains (`Learner`: the model, its optimizer, schedule, loss scaler and the way
it computes) and when its learning rate moves (`Schedule`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from cifar_exp.engine.compute import Compute
from cifar_exp.engine.optim import WeightAverage
from cifar_exp.settings import call_factory


class Schedule:
    """A learning-rate scheduler and when it steps: the one place that decides.

    Interval "step": after every optimizer step (OneCycle); "epoch": after every epoch, given
    the `monitor`ed metric when the scheduler reacts to one (ReduceLROnPlateau).
    """

    def __init__(self, scheduler: Any, interval: str = "epoch", monitor: str | None = None):
        self.scheduler, self.interval, self.monitor = scheduler, interval, monitor

    @classmethod
    def from_config(
        cls, scheduler_cfg: DictConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
    ) -> Schedule:
        """The `scheduler` config group's scheduler for `optimizer`; per-step ones (OneCycle)
        are also given the steps per epoch."""
        interval = scheduler_cfg.interval
        step_args = {"steps_per_epoch": steps_per_epoch} if interval == "step" else {}
        factory = instantiate(scheduler_cfg.lr_scheduler)
        scheduler = call_factory("scheduler.lr_scheduler", factory, optimizer, **step_args)
        return cls(scheduler, interval, scheduler_cfg.monitor)

    def after_step(self) -> None:
        if self.interval == "step":
            self.scheduler.step()

    def after_epoch(self, metrics: Mapping[str, float]) -> None:
        if self.interval != "epoch":
            return
        if self.monitor:
            self.scheduler.step(metrics[self.monitor])
        else:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


@dataclass
class Learner:
    """What the loop trains: the model and what calls it, its optimizer, schedule and loss scaler,
    and how it computes. Its state_dict is what a checkpoint keeps of it."""

    model: nn.Module  # the parameters, on their device
    forward: nn.Module  # what the loop calls: the model itself, in DDP, or compiled
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    scaler: torch.amp.GradScaler
    compute: Compute
    average: WeightAverage | None = None  # trainer.ema: the weights that are tested and kept

    @property
    def tested(self) -> nn.Module:
        """What scores the test and validation images: the weights' moving average, if kept."""
        return self.average.module if self.average else self.forward

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "ema": self.average.state_dict() if self.average else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Everything but the weights (loaded first, on their own: see resume)."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.average:
            self.average.load_state_dict(state["ema"])
