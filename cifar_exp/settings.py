"""The floor of the package: the typed config schema and every vocabulary the layers above
share (data formats, precisions, compile modes, strategies, test-time views, metric names).

`checked` turns a config section into its typed settings, naming every offending key at once:
types and ranges are declared here with pydantic, then come the checks across keys
(normalisation against channels, limits against classes, metrics against the run). What needs
the machine or the configured objects (devices, the schedule stepped through, the
augmentation against the image size) is `engine.preflight`'s. Keys not listed (model blocks,
scheduler arguments, ...) are left to the classes they configure, which the builder calls
before loading data.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal, TypeVar

import torch
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

from cifar_exp.errors import UserError

# The configs: the repository's conf/, installed as this package (see pyproject.toml).
CONF_MODULE = "cifar_exp.conf"
CONF_PATH = f"pkg://{CONF_MODULE}"  # what hydra.main takes

# The vocabularies: each the one list of its names.
# data.format: the official batches, or an image folder tree (auto: what data.root holds)
FORMATS = ("official", "folder")
LAST_BATCH = ("keep", "fill", "drop")  # data.last_batch: what becomes of a partial last batch
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
# torch.compile's modes: reduce-overhead replays CUDA graphs, max-autotune also times kernels.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
STRATEGIES = ("single", "ddp")  # trainer.strategy
# Test-time augmentation (trainer.tta): the views of each test image whose logits are averaged.
TTA = ("none", "flip", "multi")

# What every epoch records, in metrics.jsonl and in the tracker.
EPOCH_METRICS = (
    "epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "epoch_seconds",
    "images_per_second",
)  # fmt: skip
VAL_METRICS = ("val_loss", "val_acc")  # added when images are held out (data.val_size)
# The metrics that have a best value: a loss is best lowest, an accuracy highest.
SCORES = ("train_loss", "train_acc", "test_loss", "test_acc", *VAL_METRICS)


def best_is_lowest(metric: str) -> bool:
    """Whether the best value of a score (or of best_<score>) is its lowest: a loss's."""
    return metric.endswith("loss")


Auto = Literal["auto"]
Score = Literal[SCORES]


class Section(BaseModel):
    """A config section whose keys are all declared: any other is refused (a typo such as
    trainer.epoch, with or without Hydra's +)."""

    model_config = ConfigDict(extra="forbid")


class FreeSection(Section):
    """A section whose other keys go to the class it configures (a model's blocks, an
    optimizer's or scheduler's arguments), which checks them when the builder calls it."""

    model_config = ConfigDict(extra="allow")


S = TypeVar("S", bound=Section)


class Average(Section):
    decay: float | None = Field(default=None, gt=0, lt=1)  # null: no moving average
    every: PositiveInt = 1


class EarlyStopping(Section):
    patience: PositiveInt | None = None  # epochs without a better trainer.monitor; null: off


class TrainerSettings(Section):
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
    strategy: Literal[STRATEGIES] = "single"
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
    def old_test_flip(self) -> TrainerSettings:
        """Configs and checkpoints from before trainer.tta say trainer.test_flip."""
        if self.test_flip and self.tta == "none":
            self.tta = "flip"
        return self


class DataSettings(Section):
    root: str = "./data"
    format: Literal[("auto", *FORMATS)] = "auto"
    batch_size: PositiveInt
    last_batch: Literal[("auto", *LAST_BATCH)] = "auto"
    num_workers: NonNegativeInt = 0
    limit_train: PositiveInt | None = None
    limit_test: PositiveInt | None = None
    val_size: NonNegativeInt | None = None  # 0 or null: no validation set
    val_seed: NonNegativeInt = 0
    cache_dir: str | None = None
    mean: list[float] = [0.4914, 0.4822, 0.4465]
    std: list[PositiveFloat] = [0.2470, 0.2435, 0.2616]
    image_size: PositiveInt = 32


class SchedulerSettings(FreeSection):
    interval: Literal["epoch", "step"]
    monitor: str | None = None


class OptimizerSettings(FreeSection):
    lr: PositiveFloat
    weight_decay: float = Field(default=0.0, ge=0)


class ModelSettings(FreeSection):
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


class BudgetSettings(Section):
    max_params: PositiveInt | None = None
    min_rf: PositiveInt | None = None


class Settings(Section):
    """The training config's checked values; `trainer.monitor` and `optimized_metric` are
    resolved (never null)."""

    seed: int = Field(ge=0, lt=2**32)  # what NumPy accepts
    optimized_metric: Score | None = None  # null: trainer.monitor
    trainer: TrainerSettings
    data: DataSettings
    scheduler: SchedulerSettings
    optimizer: OptimizerSettings
    model: ModelSettings
    budget: BudgetSettings = BudgetSettings()
    param_groups: ParamGroups = ParamGroups()
    # Checked by the classes they configure: the augmentation (preflight) and the W&B run.
    augment: dict[str, Any] = {}
    logger: dict[str, Any] = {}
    output_root: str = "outputs"
    runtime_keys: list[str] = []

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """What the network takes: channels, height, width."""
        return (self.model.in_channels, self.data.image_size, self.data.image_size)

    @property
    def metrics(self) -> tuple[str, ...]:
        """What every epoch records: val_* only with a validation set."""
        return EPOCH_METRICS + (VAL_METRICS if self.data.val_size else ())

    @model_validator(mode="after")
    def consistent(self) -> Settings:
        data, trainer = self.data, self.trainer
        trainer.monitor = trainer.monitor or ("val_acc" if data.val_size else "test_acc")
        self.optimized_metric = self.optimized_metric or trainer.monitor
        problems = [
            *self.normalisation_problems(),
            *self.metric_problems(),
            *self.size_problems(),
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
                f"data.limit_train={data.limit_train}; hold out fewer, e.g. "
                f"data.val_size={max(data.limit_train // 10, classes)}"
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


def checked(section: type[S], cfg: DictConfig | dict, key: str = "") -> S:
    """`cfg` (the config's `key`, or all of it) as `section`; a UserError naming every value
    at fault."""
    values = OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else cfg
    try:
        return section.model_validate(values)
    except ValidationError as err:
        # A key the schema lacks is most likely a typo: say so alone, with the nearest key.
        unknown = [e["loc"] for e in err.errors() if e["type"] == "extra_forbidden"]
        if unknown:
            lines = [
                unknown_key_message([key, *loc] if key else loc, section, key) for loc in unknown
            ]
            raise UserError("\n".join(lines)) from None
        raise config_error(
            f"{'.'.join(map(str, [key, *e['loc']] if key else e['loc']))}={e.get('input')!r}: "
            f"{e['msg']}"
            if e["loc"]
            else e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        ) from None


def schema_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key that `section` declares, its nested sections' keys included."""
    keys = []
    for name, field in section.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            keys += schema_keys(field.annotation, f"{dotted}.")
    return keys


def unknown_key_message(loc: Iterable, section: type[BaseModel], key: str = "") -> str:
    """One line for a key the schema does not have, naming the nearest one it has."""
    dotted = ".".join(map(str, loc))
    known = schema_keys(section, f"{key}." if key else "")
    nearest = difflib.get_close_matches(dotted, known, n=1, cutoff=0.6)
    hint = f"did you mean {nearest[0]}?" if nearest else "it is not in the config"
    return f"unknown config key {dotted}: {hint} (the command with --cfg job lists every key)"


def config_error(problems: Iterable[str]) -> UserError:
    """One message for every problem found in the config's values: one line for one."""
    problems = list(problems)
    if len(problems) == 1:
        return UserError(f"invalid config value: {problems[0]}")
    return UserError(
        "invalid config value(s):\n" + "".join(f"  {p}\n" for p in problems)
        + "Fix them on the command line (e.g. trainer.epochs=10) or in the YAML file."
    )  # fmt: skip


UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '(\w+)'")


def call_factory(key: str, factory: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a `_partial_` object from the config at `key`; a value it rejects becomes a
    UserError naming the key."""
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError) as err:
        message = f"{key}: {factory.func.__qualname__} rejected its config: {err}"
        # A key that another option (or a preset written for one) set: say how to drop it.
        if unexpected := UNEXPECTED_KEYWORD.search(str(err)):
            message += f"; drop it with ~{key}.{unexpected[1]}, or choose an option that takes it"
        raise UserError(message) from err
