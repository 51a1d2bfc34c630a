"""A Hydra job and its sweep: a single run exits on a user error with its message; in a
multirun a failed job is reported and the sweep goes on, and `SweepReport` lists the failures
at its end."""

from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from cifar_exp.errors import (
    EXPECTED,
    UserError,
    debugging,
    exit_code,
    exit_on_user_error,
    require,
)
from cifar_exp.settings import Settings, checked
from hydra_plugins.optuna_pruning_sweeper import config_error

log = logging.getLogger("cifar_exp")


# Command-line choices that need an extra (a Hydra plugin): checked before Hydra composes the
# config, which would otherwise stop on a config group it cannot find.
SEARCH = ("search", "hydra_plugins.hydra_optuna_sweeper")
CLUSTER_SUBMITIT = ("cluster", "hydra_plugins.hydra_submitit_launcher")
# Keyed by the choice, or by the group when each of its options needs the extra.
EXTRAS = {
    "hparams_search": SEARCH,
    "hydra/sweeper=optuna": SEARCH,
    "hydra/sweeper=optuna_pruning": SEARCH,
    "hydra/launcher=joblib": ("cluster", "hydra_plugins.hydra_joblib_launcher"),
    "hydra/launcher=submitit_local": CLUSTER_SUBMITIT,
    "hydra/launcher=submitit_slurm": CLUSTER_SUBMITIT,
    "hydra/launcher=slurm": CLUSTER_SUBMITIT,
}


def require_extras(args: list[str]) -> None:
    """A UserError naming the extra to install for a choice on the command line that needs
    one it lacks."""
    for arg in args:
        needs = EXTRAS.get(arg) or EXTRAS.get(arg.partition("=")[0])
        if needs:
            extra, module = needs
            require(module, extra, arg)


def first_job() -> bool:
    """Whether this Hydra job is a single run or the first job of its sweep: what every job
    would print alike (the network, the config) is printed by that one alone."""
    job = HydraConfig.get()
    return job.mode != RunMode.MULTIRUN or job.job.num == 0


@dataclass(frozen=True)
class JobFailed:
    """What a failed multirun job returns, so that the sweep goes on and reports it."""

    message: str
    exit_code: int


def run_job(task: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a Hydra job: a single run exits on a user error; a multirun job returns JobFailed."""
    if HydraConfig.get().mode != RunMode.MULTIRUN:
        with exit_on_user_error():
            return task(cfg)
    try:
        return task(cfg)
    except EXPECTED as err:
        if debugging():
            raise
        log.error("%s", err)
        return JobFailed(str(err), exit_code(err))


# hydra-optuna-sweeper's loop, and the project's (hydra/sweeper=optuna_pruning)
OPTUNA_SWEEPERS = ("hydra_plugins.hydra_optuna_sweeper._impl",
                   "hydra_plugins.optuna_pruning_sweeper._impl")  # fmt: skip


def hide_failed_returns(record: logging.LogRecord) -> bool:
    """False for the Optuna sweeper's "Return value must be float-castable" about a JobFailed."""
    return f"'{JobFailed.__name__}(" not in record.getMessage()


class SweepReport(Callback):
    """At the end of a multirun, list the jobs that failed and why; exit non-zero if any did.

    Launchers may run the jobs in other processes or on other machines (joblib, submitit),
    each with its own copy of this callback: a failed job leaves a note in a folder of the
    sweep, read back at the end.
    """

    def __init__(self) -> None:
        self.notes: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # One folder per session: a continued optuna study reuses its sweep folder.
        self.notes = Path(config.hydra.sweep.dir) / f".failed-jobs-{uuid.uuid4().hex[:8]}"
        # The job has logged why it failed and the list at the end names it: the sweeper's own
        # warning about the value it returned would only wrap it.
        for sweeper in OPTUNA_SWEEPERS:
            logging.getLogger(sweeper).addFilter(hide_failed_returns)
        # A value every job would refuse (a search's data.val_size beyond data.limit_train, an
        # unknown key) stops the sweep before its first job, in one message.
        with exit_on_user_error():
            checked(Settings, OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]))
            if error := config_error(config.hydra.sweeper):  # a pruned search's storage
                raise UserError(error)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if self.notes is None:  # a single run: its error is its own exit
            return
        result = job_return._return_value  # the exception itself when the job raised
        if job_return.status == JobStatus.FAILED:
            message = f"{type(result).__name__}: {result}"
        elif isinstance(result, JobFailed):
            message = result.message
        else:
            return
        job = job_return.hydra_cfg.hydra.job
        self.notes.mkdir(parents=True, exist_ok=True)
        # One line a job: the job's own log (train.log) keeps the whole message.
        why = message.partition("\n")[0]
        (self.notes / f"{job.num}.txt").write_text(
            f"job {job.num} ({job.override_dirname or 'no overrides'}): {why}"
        )

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.notes is None or not self.notes.is_dir():
            return
        notes = sorted(self.notes.glob("*.txt"), key=lambda p: int(p.stem))
        failures = [p.read_text() for p in notes]
        shutil.rmtree(self.notes)
        log.error("%d job(s) of the sweep failed:\n%s", len(failures), "\n".join(failures))
        raise SystemExit(1)
