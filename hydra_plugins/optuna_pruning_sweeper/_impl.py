"""hydra-optuna-sweeper's ask-and-tell loop, with the study's pruner handed to the jobs and
the trials it stops told PRUNED, and heartbeats for the trials a session runs.

hydra-optuna-sweeper 1.3 keeps each trial inside its loop (Hydra issue #1954): a job cannot
report intermediate values, and the loop tells only COMPLETE or FAIL. This loop asks and tells
as that one does (the same search space, `params` syntax, samplers, batches of n_jobs trials,
max_failure_rate and optimization_results.yaml), and adds:

- the pruner: the study is created with it, and each job is given its trial's number
  (`_job.TRIAL_ENV`, through hydra.job.env_set) to reopen the trial from the storage, report
  to it and ask the pruner; a job that returns `Pruned` is told PRUNED;
- the heartbeat: while a batch runs, a thread records a heartbeat for each of its trials; a
  search killed mid-trial stops beating, and the next session (before each batch) marks such
  trials failed (`optuna.storages.fail_stale_trials`);
- the trial check: a function (`trial_check`) given each trial's composed config may refuse it
  before it is launched (a network over its parameter budget); the study is told PRUNED with
  the reason in the user attribute `refused`, and another trial takes its place;
- `params` set to null are dropped, so that a preset built on another can leave out some of
  its parameters;
- one study for searches on several machines (a PostgreSQL database): searches that start
  together set an empty database up once (`open_database`), and one's heartbeat recorded
  while another checks for stale trials is not taken for a stale one (`HeartbeatRDBStorage`).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import optuna
import sqlalchemy
from hydra.core.utils import JobReturn
from hydra.types import HydraContext, TaskFunction
from hydra.utils import get_method
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.samplers import GridSampler
from optuna.storages._rdb import models as rdb_models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import TrialState

from hydra_plugins.optuna_pruning_sweeper._job import REFUSED, TRIAL_ENV, Pruned, config_error

log = logging.getLogger(__name__)
# Refusals in a row after which a search stops: its space lies (almost) all outside the check.
MAX_REFUSALS_IN_A_ROW = 100


class PruningSweeperImpl(OptunaSweeperImpl):
    def __init__(
        self,
        *,
        pruner: optuna.pruners.BasePruner | None = None,
        heartbeat_interval: int | None = None,
        grace_period: int | None = None,
        trial_check: str | None = None,
        trials_per: str = "session",
        **config: Any,
    ) -> None:
        super().__init__(**config)
        # NopPruner never prunes: its jobs are run as hydra-optuna-sweeper runs them.
        self.pruner = None if isinstance(pruner, optuna.pruners.NopPruner) else pruner
        self.heartbeat_interval, self.grace_period = heartbeat_interval, grace_period
        self.trial_check = get_method(trial_check) if trial_check else None
        self.trials_per = trials_per

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        if error := config_error(config.hydra.sweeper):
            raise ValueError(error)
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config_loader = hydra_context.config_loader  # composes a trial's config to check

    def _parse_sweeper_params_config(self) -> list[str]:
        return [f"{k!s}={v}" for k, v in (self.params or {}).items() if v is not None]

    def study_storage(self) -> optuna.storages.RDBStorage | None:
        """The storage URL's database (`open_database`), which keeps heartbeats when
        heartbeat_interval is set; None: in memory."""
        if not isinstance(self.storage, str):
            return self.storage
        return open_database(
            self.storage, heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period
        )

    def space(self, arguments: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The distributions to sample and the fixed values, from `params` and the command
        line; a GridSampler is given the grid and n_trials its size at most."""
        self._process_searchspace_config()
        distributions, fixed = create_params_from_overrides(
            [*self._parse_sweeper_params_config(), *arguments]
        )
        distributions = {**(self.search_space_distributions or {}), **distributions}
        for name in fixed:
            distributions.pop(name, None)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == GridSampler:
            grid = {k: self._to_grid_sampler_choices(v) for k, v in distributions.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
            log.info(f"Updating num of trials to {self.n_trials} due to using GridSampler.")
        return distributions, fixed

    def sweep(self, arguments: list[str]) -> None:
        distributions, fixed = self.space(arguments)
        directions = self._get_directions()
        if self.pruner is not None and len(directions) > 1:
            raise ValueError(
                "hydra.sweeper.pruner prunes single-objective studies only (Optuna 2.10): choose "
                "hydra/sweeper/pruner=none or one hydra.sweeper.direction"
            )
        study = optuna.create_study(
            study_name=self.study_name, storage=self.study_storage(), sampler=self.sampler,
            pruner=self.pruner, directions=directions, load_if_exists=True,
        )  # fmt: skip
        log.info(f"Study name: {study.study_name}")
        log.info(f"Storage: {shown_storage(self.storage)}")
        log.info(f"Sampler: {type(self.sampler).__name__}")
        log.info(f"Pruner: {type(self.pruner).__name__ if self.pruner else None}")
        log.info(f"Directions: {directions}")
        fail_stale_trials(study)  # before the first batch, and after each (below)
        n_trials_to_go = self.n_trials
        if self.trials_per == "study":
            ended = len(ended_trials(study))
            n_trials_to_go -= ended
            log.info(f"The study has {ended} of its n_trials={self.n_trials} trials")
        while n_trials_to_go > 0:
            batch = [
                self.ask_runnable(study, distributions, fixed)
                for _ in range(min(n_trials_to_go, self.n_jobs))
            ]
            trials, overrides = [t for t, _ in batch], [o for _, o in batch]
            if self.pruner is not None:
                overrides = [
                    (*job, f"++hydra.job.env_set.{TRIAL_ENV}={trial.number}")
                    for job, trial in zip(overrides, trials, strict=True)
                ]
            with heartbeats(study, trials):
                returns = self.launcher.launch(overrides, initial_job_idx=self.job_idx)
            self.job_idx += len(returns)
            failures = [
                err for trial, ret in zip(trials, returns, strict=True)
                if (err := self.tell(study, trial, ret, len(directions))) is not None
            ]  # fmt: skip
            if len(failures) / len(returns) > self.max_failure_rate:
                log.error(
                    f"Failed {failures} times out of {len(returns)} "
                    f"with max_failure_rate={self.max_failure_rate}."
                )
                for ret in returns:
                    ret.return_value  # noqa: B018 (raises the job's own error, with its traceback)
            n_trials_to_go -= len(trials)
            fail_stale_trials(study)
        self.write_results(study, directions)

    def ask_runnable(
        self, study: optuna.Study, distributions: dict[str, Any], fixed: dict[str, Any]
    ) -> tuple[optuna.Trial, Sequence[str]]:
        """A new trial and its overrides, one that trial_check does not refuse: each refused
        one is told PRUNED, with why in its user attribute `refused`, before it is launched;
        it does not count in n_trials. ValueError after MAX_REFUSALS_IN_A_ROW in a row."""
        for _ in range(MAX_REFUSALS_IN_A_ROW):
            trial = study.ask()
            if study._storage.is_heartbeat_enabled():  # killed before its launch: still stale
                study._storage.record_heartbeat(trial._trial_id)
            try:
                (overrides,) = self._configure_trials([trial], distributions, fixed)
                if self.trial_check is None:
                    return trial, overrides
                config = self.config_loader.load_sweep_config(self.config, list(overrides))
                reason = self.trial_check(config)
            except BaseException:  # not left running in the study
                study.tell(trial, state=TrialState.FAIL)
                raise
            if reason is None:
                return trial, overrides
            trial.set_user_attr(REFUSED, reason)
            study.tell(trial, state=TrialState.PRUNED)
            log.info(f"Trial {trial.number} refused before training: {reason}")
        raise ValueError(
            f"{MAX_REFUSALS_IN_A_ROW} trials in a row were refused by hydra.sweeper.trial_check "
            f"(the last: {reason}): narrow hydra.sweeper.params, or widen what the check allows"
        )

    def tell(
        self, study: optuna.Study, trial: optuna.Trial, ret: JobReturn, n_objectives: int
    ) -> Exception | None:
        """Tell the study how the trial's job ended: COMPLETE with its value(s), PRUNED if it
        returned `Pruned`, or FAIL (returned as the error) if it raised or returned no value.
        A trial that another session has meanwhile marked failed (its heartbeat was late by
        more than the grace period) keeps that state."""
        if (state := study._storage.get_trial(trial._trial_id).state).is_finished():
            log.warning(
                f"Trial {trial.number} was marked {state.name} by another search while it ran "
                "(no heartbeat for longer than hydra.sweeper.grace_period): its result is not "
                "recorded in the study; its run folder keeps it"
            )
            return None
        try:
            value = ret.return_value  # raises the job's error
            if isinstance(value, Pruned):
                study.tell(trial, state=TrialState.PRUNED)
                log.info(f"Trial {trial.number} pruned after step {value.step}")
                return None
            study.tell(trial, values=trial_values(value, n_objectives))
        except Exception as err:
            grid = isinstance(self.sampler, GridSampler)
            if grid and "`Study.stop` is supposed to be invoked" in str(err):
                return None  # the grid is exhausted: the trial was told before the sampler said so
            study.tell(trial, state=TrialState.FAIL)
            log.warning(f"Failed experiment: {err}")
            return err
        return None

    def write_results(self, study: optuna.Study, directions: list[str]) -> None:
        """optimization_results.yaml: the best trial (one objective) or the Pareto front."""
        if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            log.warning("No trial of the study has finished: no best trial to write")
            return
        if len(directions) < 2:
            best = study.best_trial
            results = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info(f"Best parameters: {best.params}")
            log.info(f"Best value: {best.value}")
        else:
            front = [{"params": t.params, "values": t.values} for t in study.best_trials]
            results = {"name": "optuna", "solutions": front}
            log.info(f"Number of Pareto solutions: {len(front)}")
            for t in study.best_trials:
                log.info(f"    Values: {t.values}, Params: {t.params}")
        OmegaConf.save(
            OmegaConf.create(results), f"{self.config.hydra.sweep.dir}/optimization_results.yaml"
        )


def open_database(url: str, **options: Any) -> HeartbeatRDBStorage:
    """The study database at `url`, its tables created if it has none. Searches started at the
    same moment on an empty database (a job array on several machines) all create them: on
    PostgreSQL all but the first fail on its rows once it commits, then find them on a retry.
    """
    # Optuna sets a database up in three steps (the tables, its version row, Alembic's
    # revision), each of which another search may win.
    for _ in range(3):
        try:
            return HeartbeatRDBStorage(url, **options)
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            log.info("Another search was setting the study's database up: opening it again")
    return HeartbeatRDBStorage(url, **options)


class HeartbeatRDBStorage(optuna.storages.RDBStorage):
    """Optuna 2.10's RDBStorage, with its test for stale trials corrected. Optuna's reads the
    database's time, then the running trials' heartbeats, and compares `.seconds` of the
    difference with the grace period: a heartbeat that another search records in between
    (PostgreSQL's now() is the time the transaction began) makes the difference negative, its
    `.seconds` nearly a day, and that search's live trial was failed. This one compares the
    difference itself."""

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        grace_period = datetime.timedelta(seconds=self.grace_period or 2 * self.heartbeat_interval)
        with _create_scoped_session(self.scoped_session, True) as session:
            now = session.execute(sqlalchemy.func.now()).scalar().replace(tzinfo=None)
            heartbeats = (
                session.query(
                    rdb_models.TrialModel.trial_id, rdb_models.TrialHeartbeatModel.heartbeat
                )
                .join(rdb_models.TrialHeartbeatModel)
                .filter(rdb_models.TrialModel.study_id == study_id)
                .filter(rdb_models.TrialModel.state == TrialState.RUNNING)
                .all()
            )
        return [trial_id for trial_id, heartbeat in heartbeats if now - heartbeat > grace_period]


def trial_values(value: Any, n_objectives: int) -> list[float]:
    """A job's return value as the trial's values; ValueError if it is not one float-castable
    value per objective."""
    try:
        values = [float(value)] if n_objectives == 1 else [float(v) for v in value]
    except (ValueError, TypeError) as err:
        raise ValueError(f"Return value must be float-castable. Got '{value}'.") from err
    if len(values) != n_objectives:
        raise ValueError(f"Expected {n_objectives} values, got {len(values)}: {value}")
    return values


def shown_storage(storage: Any) -> str:
    """The storage for the log: a database URL with its password masked (***)."""
    if not isinstance(storage, str):
        return str(storage)
    try:
        return repr(sqlalchemy.engine.make_url(storage))
    except sqlalchemy.exc.ArgumentError:
        return storage


def ended_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The trials that count towards a study's n_trials (trials_per: study): those that
    ended COMPLETE or PRUNED by the pruner; not the failed ones (a killed search's trial), nor
    those that trial_check refused."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return [
        t for t in study.get_trials(deepcopy=False, states=states) if REFUSED not in t.user_attrs
    ]


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark failed the study's trials left running by a session that stopped beating (killed),
    and say which; nothing without heartbeats."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with warnings.catch_warnings():
        # Experimental in Optuna 2.9 and 2.10 (stable since 3.0): a warning every batch.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    if stale := sorted(t.number for t in failed if t.number in running):
        log.warning(
            f"Trial(s) {stale} were left running by a search that stopped (no heartbeat for "
            "longer than the grace period): marked failed"
        )


@contextlib.contextmanager
def heartbeats(study: optuna.Study, trials: Sequence[optuna.Trial]) -> Iterator[None]:
    """A heartbeat for each trial every heartbeat_interval seconds while the block runs (the
    first at once), as Study.optimize does for the trial it runs; nothing without heartbeats."""
    storage = study._storage
    if not storage.is_heartbeat_enabled():
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            for trial in trials:
                storage.record_heartbeat(trial._trial_id)
            if stop.wait(timeout=storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name="optuna-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
