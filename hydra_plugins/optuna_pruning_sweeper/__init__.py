"""hydra-optuna-sweeper with pruning: each job of a search learns its Optuna trial, reports a
value after every step (epoch) and stops when the study's pruner says so; the sweeper records
it as pruned. Killed searches leave no trial running forever (Optuna's heartbeat).

    hydra/sweeper: optuna_pruning            # hydra-optuna-sweeper's keys, `params` included
    hydra.sweeper.pruner: {_target_: optuna.pruners.MedianPruner, n_warmup_steps: 1}
    hydra/sweeper/pruner=median              # or successive_halving, hyperband, none

A task function asks for its trial with `job_trial()` (None unless the sweeper prunes), reports
to it, and returns `Pruned(step)` when `trial.should_prune()` stops it. Hydra discovers the
sweeper here, in the `hydra_plugins` namespace; this module stays light (no Optuna import): the
project's jobs import it whether or not the search extra is installed.
"""

from hydra_plugins.optuna_pruning_sweeper._job import (
    REFUSED,
    TRIAL_ENV,
    Pruned,
    config_error,
    job_trial,
)

__all__ = ["REFUSED", "TRIAL_ENV", "Pruned", "config_error", "job_trial"]
