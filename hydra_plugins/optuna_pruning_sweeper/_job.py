"""The job's side of a pruned search: the trial the sweeper handed it, and what it returns
when the pruner stopped it. Named with a leading underscore so that Hydra's plugin scan, which
executes every other module of a plugin package again, keeps `Pruned` one class."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig

if TYPE_CHECKING:
    import optuna

# The number of the trial a job runs, set by the sweeper through hydra.job.env_set: a Hydra
# override of its own for every job, which any launcher (basic, joblib, submitit) applies in the
# process that runs the job, and which stays out of the job's task overrides and folder name.
TRIAL_ENV = "HYDRA_OPTUNA_TRIAL"
# The user attribute of a trial that the sweeper's trial_check refused before launching it: why
# (the trial is told PRUNED). Here, not in _impl, so that readers of a study need no Optuna import.
REFUSED = "refused"


def config_error(sweeper: DictConfig) -> str | None:
    """Why this sweeper config cannot run, in one line naming the key and the fix; None if it
    can. A pruned search's jobs reopen their trials from the storage: it must be a database,
    not the sweeper's memory; a PostgreSQL database needs its driver (the search extra)."""
    if sweeper.get("trials_per", "session") not in ("session", "study"):
        return (
            f"hydra.sweeper.trials_per={sweeper.trials_per} is not an option: session (n_trials "
            "a session runs) or study (n_trials the study holds)"
        )
    pruner, storage = sweeper.get("pruner"), sweeper.get("storage")
    prunes = pruner is not None and pruner.get("_target_") != "optuna.pruners.NopPruner"
    if prunes and not isinstance(storage, str):
        return (
            f"hydra.sweeper.pruner needs a storage that the jobs can open, not "
            f"hydra.sweeper.storage={storage}: set it to a database URL "
            "(sqlite:///<file>, postgresql://...), or hydra/sweeper/pruner=none"
        )
    postgres = isinstance(storage, str) and storage.startswith("postgresql")
    if postgres and importlib.util.find_spec("psycopg2") is None:
        return (
            "hydra.sweeper.storage=postgresql://... needs PostgreSQL's driver, psycopg2: "
            "pip install 'cifar-exp[search]' (make install installs every extra)"
        )
    return None


@dataclass(frozen=True)
class Pruned:
    """What a job returns when its trial's pruner stopped it: the sweeper tells the study
    PRUNED (with the last reported value), not FAILED."""

    step: int  # the last step (epoch) the job trained and reported


def job_trial() -> optuna.trial.Trial | None:
    """The trial of this job of a pruned search, reopened from the study's storage with the
    sweeper's pruner; None when the sweeper gave the job none (no pruner, another sweeper, a
    single run)."""
    number = os.environ.get(TRIAL_ENV)
    if number is None:
        return None
    import optuna  # the search extra: only a pruning sweeper sets TRIAL_ENV
    from sqlalchemy.pool import NullPool

    sweeper = HydraConfig.get().sweeper
    # A connection per query, closed after it: a pool would keep its connections open after
    # the job, until Python's garbage collector finds the storage (a reference cycle), and a
    # long search's jobs would fill the server's max_connections (PostgreSQL: 100).
    storage = optuna.storages.RDBStorage(sweeper.storage, engine_kwargs={"poolclass": NullPool})
    study = optuna.load_study(
        study_name=sweeper.study_name, storage=storage, pruner=instantiate(sweeper.pruner)
    )
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(number))
    return optuna.trial.Trial(study, trial_id)
