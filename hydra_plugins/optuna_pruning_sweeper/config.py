"""hydra/sweeper=optuna_pruning: hydra-optuna-sweeper's config with a pruner and a heartbeat,
and the pruners as options of hydra/sweeper/pruner.

The keys are hydra-optuna-sweeper 1.3's (OptunaSweeperConf), written out rather than inherited:
Hydra's plugin scan executes that module again after this one has imported it, and a config
typed by the first run's classes would refuse the second run's (the sampler options).
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is
# in sys.modules, where dataclasses would look its string annotations up.
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

PROVIDER = "optuna_pruning_sweeper"


@dataclass
class PruningSweeperConf:
    _target_: str = (
        "hydra_plugins.optuna_pruning_sweeper.optuna_pruning_sweeper.OptunaPruningSweeper"
    )
    defaults: list[Any] = field(default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}])
    sampler: Any = MISSING  # an option of hydra/sweeper/sampler (tpe, random, grid, ...)
    direction: Any = "minimize"  # or maximize, or a list of them (several objectives)
    storage: Any = None  # a database URL (sqlite:///<file>, postgresql://...); null: in memory
    study_name: Optional[str] = None  # noqa: UP045 (OmegaConf 2.3 reads typing's Optional)
    n_trials: int = 20  # trials per session, or in the study (trials_per)
    # What n_trials counts: this session's trials (session: hydra-optuna-sweeper's meaning, a
    # continued study adds n_trials more) or the study's (study: a session runs until the study
    # holds n_trials that completed or were pruned, so a search that was killed, run again,
    # goes on to the number asked for; failed and refused trials do not count).
    trials_per: str = "session"
    n_jobs: int = 2  # trials launched at once (a batch: the next starts when all have ended)
    max_failure_rate: float = 0.0  # the share of a batch that may fail before the search stops
    search_space: Optional[dict[str, Any]] = None  # noqa: UP045 (deprecated: use params)
    # A parameter set to null is left out (a preset built on another drops one it inherits).
    params: Optional[dict[str, Any]] = None  # noqa: UP045
    custom_search_space: Optional[str] = None  # noqa: UP045
    # An Optuna pruner: an option of hydra/sweeper/pruner (none, median, successive_halving,
    # hyperband) or {_target_: optuna.pruners.<Pruner>, ...}. none (NopPruner): no pruning,
    # the jobs get no trial and run as with hydra-optuna-sweeper.
    pruner: Any = MISSING
    # Seconds between the sweeper's heartbeats for its running trials; null: none. A session
    # marks failed the trials of the study left running (by a search that was killed) whose
    # last heartbeat is older than grace_period (null: 2 * heartbeat_interval).
    heartbeat_interval: Optional[int] = None  # noqa: UP045
    grace_period: Optional[int] = None  # noqa: UP045
    # A function (its dotted path) given each trial's composed config before it is launched,
    # returning why the trial cannot run, or None. A refused trial is told PRUNED (the reason
    # in its user attribute `refused`), does not count in n_trials, and is not a failure.
    trial_check: Optional[str] = None  # noqa: UP045


# The pruners, as plain configs (not typed): a search's YAML may replace the option by any
# pruner's {_target_: ..., its arguments}, and Optuna checks the arguments.
PRUNERS = {
    # No pruning: every trial trains to its end.
    "none": {"_target_": "optuna.pruners.NopPruner"},
    # Stops a trial whose value at a step is worse than the median of the other trials' there.
    "median": {
        "_target_": "optuna.pruners.MedianPruner",
        "n_startup_trials": 5,  # trials that finish before any is pruned
        "n_warmup_steps": 0,  # steps (epochs) of each trial before it can be pruned
        "interval_steps": 1,
        "n_min_trials": 1,  # trials that reported the step before the median counts
    },
    # Asynchronous successive halving: at min_resource * reduction_factor^k steps, the trials
    # outside the best 1/reduction_factor of those that reached the rung stop.
    "successive_halving": {
        "_target_": "optuna.pruners.SuccessiveHalvingPruner",
        "min_resource": "auto",
        "reduction_factor": 4,
        "min_early_stopping_rate": 0,
        "bootstrap_count": 0,
    },
    # Several successive-halving brackets, each trial in one of them.
    "hyperband": {
        "_target_": "optuna.pruners.HyperbandPruner",
        "min_resource": 1,
        "max_resource": "auto",  # the steps of the first finished trial
        "reduction_factor": 3,
        "bootstrap_count": 0,
    },
}

store = ConfigStore.instance()
store.store(
    group="hydra/sweeper", name="optuna_pruning", node=PruningSweeperConf, provider=PROVIDER
)
for name, node in PRUNERS.items():
    store.store(group="hydra/sweeper/pruner", name=name, node=node, provider=PROVIDER)
