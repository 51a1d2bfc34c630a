"""The sweeper Hydra discovers (hydra/sweeper=optuna_pruning); its work is in `_impl`, imported
only when a search starts, so that Hydra's plugin scan does not load Optuna."""

from __future__ import annotations

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaPruningSweeper(Sweeper):
    """hydra-optuna-sweeper's OptunaSweeper with `pruner`, `heartbeat_interval` and
    `grace_period` (config.PruningSweeperConf)."""

    def __init__(self, **config: Any) -> None:
        from hydra_plugins.optuna_pruning_sweeper._impl import PruningSweeperImpl

        self.sweeper = PruningSweeperImpl(**config)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        return self.sweeper.sweep(arguments)
