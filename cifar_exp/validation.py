"""The one validation gate: every value the code branches on, indexes with or hands to a
library that would fail late, checked before distributed set-up, before any checkpoint is
read and before any data is loaded. `validate` returns the checked values, typed.

Hydra already refuses unknown groups, options and keys. Types and ranges are declared here
with pydantic, which names every offending key at once; then come the checks across keys
(normalisation against channels, limits against classes, metrics against the run) and those
that need the configured objects: the scheduler is stepped through a run of the configured
length on a stand-in optimizer, and the augmentation is checked against the image size.
Keys not listed (model blocks, scheduler arguments, ...) are left to the classes they
configure, which the builder calls before loading data.
"""

from __future__ import annotations

import math
import os
from typing import Literal, TypeVar

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from cifar_exp import data, distributed, loaders
from cifar_exp.compute import COMPILE_MODES, PRECISIONS, resolve_device
from cifar_exp.errors import UserError
from cifar_exp.loop import EPOCH_METRICS, SCORES, TTA, VAL_METRICS, LoopOptions, Schedule

Auto = Literal["auto"]
Score = Literal[SCORES]


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")


S = TypeVar("S", bound=Section)


class Average(Section):
    decay: float | None = Field(default=None, gt=0, lt=1)  # null: no moving average
    every: PositiveInt = 1


class EarlyStopping(Section):
    patience: PositiveInt | None = None  # epochs without a better trainer.monitor; null: off


class Trainer(Section):
    epochs: PositiveInt
    device: str = "auto"
    deterministic: bool = False
    progress: bool = True
    resume: str | None = None
    monitor: Score | None = None  # null: val_acc with data.val_size, else test_acc
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    tta: Literal[TTA] = "none"
    test_flip: bool | None = None  # the key tta replaced: true is tta=flip
    ema: Average = Average()
    early_stopping: EarlyStopping = EarlyStopping()
    profile_steps: PositiveInt | None = None  # torch.profiler over this many training steps
    precision: Literal[("auto", *PRECISIONS)] = "auto"
    channels_last: bool = True
    compile: bool | Auto = "auto"
    compile_mode: Literal[COMPILE_MODES] = "default"
    subsampled_convs: bool | Auto = "auto"
    packed_dropout: bool | Auto = "auto"
    threads: PositiveInt | None = None
    strategy: Literal[distributed.STRATEGIES] = "single"
    sync_batchnorm: bool = False

    @field_validator("device")
    @classmethod
    def known_device(cls, name: str) -> str:
        if name != "auto":
            try:
                torch.device(name)
            except RuntimeError:
                raise ValueError("not a device: use auto, cpu, cuda, cuda:<n> or mps") from None
        return name

    @model_validator(mode="after")
    def old_test_flip(self) -> Trainer:
        """Configs and checkpoints from before trainer.tta say trainer.test_flip."""
        if self.test_flip and self.tta == "none":
            self.tta = "flip"
        return self


class Data(Section):
    root: str = "./data"
    format: Literal[data.FORMATS]
    batch_size: PositiveInt
    last_batch: Literal[("auto", *loaders.LAST_BATCH)] = "auto"
    num_workers: NonNegativeInt = 0
    limit_train: PositiveInt | None = None
    limit_test: PositiveInt | None = None
    val_size: NonNegativeInt | None = None  # 0 or null: no validation set
    val_seed: NonNegativeInt = 0
    cache_dir: str | None = None
    mean: list[float] = [0.4914, 0.4822, 0.4465]
    std: list[PositiveFloat] = [0.2470, 0.2435, 0.2616]
    image_size: PositiveInt = 32


class Scheduler(Section):
    interval: Literal["epoch", "step"]
    monitor: str | None = None


class Optimizer(Section):
    lr: PositiveFloat
    weight_decay: float = Field(default=0.0, ge=0)


class Model(Section):
    in_channels: PositiveInt = 3
    num_classes: PositiveInt = 10
    dropout: float = Field(default=0.0, ge=0, lt=1)
    whiten: bool = False
    identity_init: bool = False


class NormAndBias(Section):
    lr_scale: PositiveFloat = 1.0
    weight_decay: float | None = Field(default=None, ge=0)  # null: optimizer.weight_decay


class ParamGroups(Section):
    norm_and_bias: NormAndBias = NormAndBias()


class Budget(Section):
    max_params: PositiveInt | None = None
    min_rf: PositiveInt | None = None


class Settings(Section):
    """The training config's checked values; `trainer.monitor` and `optimized_metric` are
    resolved (never null)."""

    seed: int = Field(ge=0, lt=2**32)  # what NumPy accepts
    optimized_metric: Score | None = None  # null: trainer.monitor
    trainer: Trainer
    data: Data
    scheduler: Scheduler
    optimizer: Optimizer
    model: Model
    budget: Budget = Budget()
    param_groups: ParamGroups = ParamGroups()

    @property
    def metrics(self) -> tuple[str, ...]:
        """What every epoch records: val_* only with a validation set."""
        return EPOCH_METRICS + (VAL_METRICS if self.data.val_size else ())

    @property
    def device(self) -> torch.device:
        return resolve_device(self.trainer.device)

    @property
    def loop(self) -> LoopOptions:
        trainer = self.trainer
        return LoopOptions(
            trainer.epochs,
            self.seed,
            trainer.label_smoothing,
            trainer.tta,
            trainer.progress,
            trainer.profile_steps,
        )

    @model_validator(mode="after")
    def consistent(self) -> Settings:
        data, trainer = self.data, self.trainer
        trainer.monitor = trainer.monitor or ("val_acc" if data.val_size else "test_acc")
        self.optimized_metric = self.optimized_metric or trainer.monitor
        problems = [
            *self.normalisation_problems(),
            *self.metric_problems(),
            *self.size_problems(),
            *self.device_problems(),
            *self.optimizer_problems(),
        ]
        if problems:
            raise ValueError("\n  ".join(problems))
        return self

    def normalisation_problems(self) -> list[str]:
        channels, data = self.model.in_channels, self.data
        if len(data.mean) == len(data.std) == channels:
            return []
        return [
            f"data.mean={data.mean} and data.std={data.std} need one value per image channel "
            f"(model.in_channels={channels})"
        ]

    def metric_problems(self) -> list[str]:
        problems = []
        for key, value in (
            ("trainer.monitor", self.trainer.monitor),
            ("optimized_metric", self.optimized_metric),
            ("scheduler.monitor", self.scheduler.monitor),
        ):
            if value is not None and value not in self.metrics:
                problems.append(
                    f"{key}={value} is not a metric of this run; choose one of "
                    f"{', '.join(self.metrics)} (val_* need data.val_size)"
                )
        return problems

    def size_problems(self) -> list[str]:
        data, classes = self.data, self.model.num_classes
        problems = [
            f"data.{key}={value} is fewer images than the {classes} classes "
            "(model.num_classes); every class needs at least one"
            for key, value in (
                ("limit_train", data.limit_train),
                ("limit_test", data.limit_test),
                ("val_size", data.val_size or None),
            )
            if value is not None and value < classes
        ]
        if data.val_size and data.limit_train and data.val_size >= data.limit_train:
            problems.append(
                f"data.val_size={data.val_size} leaves no training images of "
                f"data.limit_train={data.limit_train}; hold out fewer"
            )
        return problems

    def optimizer_problems(self) -> list[str]:
        # fp16's loss scaler unscales the gradients it finds in the optimizer's groups; Muon's
        # groups hold views whose gradients are filled only when it steps.
        muon = str(self.optimizer.model_extra.get("_target_", "")).endswith("MuonForFilters")
        if muon and self.trainer.precision == "fp16":
            return [
                "optimizer=muon cannot train with trainer.precision=fp16 (its loss scaler would "
                "not see the filters' gradients); use trainer.precision=bf16, fp32 or auto"
            ]
        return []

    def device_problems(self) -> list[str]:
        trainer, problems = self.trainer, []
        device = torch.device(trainer.device) if trainer.device != "auto" else None
        kind, gpus = device and device.type, torch.cuda.device_count()
        if kind == "cuda" and (device.index or 0) >= gpus:
            problems.append(
                f"trainer.device={trainer.device}, but PyTorch sees {gpus} CUDA device(s) "
                "here; use trainer.device=auto or cpu"
            )
        if kind == "mps" and not torch.backends.mps.is_available():
            problems.append(f"trainer.device={trainer.device}, but MPS is not available here")
        if trainer.strategy != "ddp":
            return problems
        world_size = os.environ.get("WORLD_SIZE")
        if world_size is None:
            problems.append(
                "trainer.strategy=ddp needs one process per device, started by torchrun: "
                "torchrun --nproc_per_node=<N> -m cifar_exp.train trainer.strategy=ddp ..."
            )
        elif self.data.batch_size % int(world_size):
            problems.append(
                f"data.batch_size={self.data.batch_size} is the batch of all {world_size} "
                "processes together; make it a multiple of their number"
            )
        if trainer.sync_batchnorm and self.device.type != "cuda":
            problems.append(
                "trainer.sync_batchnorm needs CUDA devices (PyTorch's SyncBatchNorm runs on "
                "GPUs only); on the CPU use trainer.sync_batchnorm=false or a batch-independent "
                "norm such as model/norm=group"
            )
        return problems


def checked(section: type[S], cfg: DictConfig | dict, key: str = "") -> S:
    """`cfg` (the config's `key`, or all of it) as `section`; a UserError naming every value
    at fault."""
    values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    try:
        return section.model_validate(values)
    except ValidationError as err:
        problems = [
            f"  {'.'.join(map(str, [key, *e['loc']] if key else e['loc']))}={e.get('input')!r}: "
            f"{e['msg']}"
            if e["loc"]
            else f"  {e['msg'].removeprefix('Value error, ')}"
            for e in err.errors()
        ]
        raise UserError(
            "invalid config value(s):\n" + "\n".join(problems) + "\n"
            "Fix them on the command line (e.g. trainer.epochs=10) or in the YAML file."
        ) from None


def validate(cfg: DictConfig) -> Settings:
    """The training config's values, checked and typed; a UserError naming what is at fault."""
    settings = checked(Settings, cfg)
    check_schedule(
        cfg.scheduler, settings.trainer.epochs, settings.param_groups.norm_and_bias.lr_scale
    )
    instantiate(cfg.augment).check(settings.data.image_size)
    return settings


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
