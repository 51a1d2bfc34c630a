"""Types and ranges of the training config, checked before any data is loaded.

Hydra already refuses unknown groups, options and keys. The values' types and ranges are
declared here with pydantic, which names every offending key at once; keys not listed here
(model blocks, scheduler arguments, ...) are left to the classes they configure.
"""

from __future__ import annotations

from typing import Literal

from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from cifar_exp.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="allow")


class Trainer(Section):
    epochs: PositiveInt
    deterministic: bool
    progress: bool
    resume: str | None = None
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    test_flip: bool = False
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    channels_last: bool = True
    compile: bool | Literal["auto"] = "auto"
    subsampled_convs: bool | Literal["auto"] = "auto"
    packed_dropout: bool | Literal["auto"] = "auto"
    threads: PositiveInt | None = None
    strategy: Literal["single", "ddp"] = "single"
    sync_batchnorm: bool = False


class Data(Section):
    format: Literal["official", "folder"]
    batch_size: PositiveInt
    num_workers: int = Field(ge=0)
    limit_train: PositiveInt | None
    limit_test: PositiveInt | None
    val_size: int | None = Field(default=None, ge=0)
    val_seed: int = 0


class Optimizer(Section):
    lr: PositiveFloat
    weight_decay: float = Field(default=0.0, ge=0)


class Model(Section):
    dropout: float = Field(default=0.0, ge=0, lt=1)


class TrainConfig(Section):
    seed: int
    optimized_metric: str | None = None
    trainer: Trainer
    data: Data
    optimizer: Optimizer
    model: Model


def validate(cfg: DictConfig) -> None:
    """Raise a UserError naming every key whose value has the wrong type or range."""
    try:
        TrainConfig.model_validate(OmegaConf.to_container(cfg, resolve=True))
    except ValidationError as err:
        problems = [
            f"  {'.'.join(map(str, e['loc']))}={e.get('input')!r}: {e['msg']}" for e in err.errors()
        ]
        raise UserError(
            "invalid config value(s):\n" + "\n".join(problems) + "\n"
            "Fix them on the command line (e.g. trainer.epochs=10) or in the YAML file."
        ) from None
