"""`python -m cifar_exp.train [overrides]`: train the configured model, one run per Hydra job."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cifar_exp import distributed
from cifar_exp.engine import preflight, resume, signals
from cifar_exp.engine.build import build
from cifar_exp.engine.compute import resolve_device, seed_everything
from cifar_exp.engine.jobs import require_extras, run_job
from cifar_exp.engine.loop import LoopOptions, fit
from cifar_exp.errors import exit_on_user_error
from cifar_exp.settings import CONF_PATH
from cifar_exp.track.record import RunRecord
from hydra_plugins.optuna_pruning_sweeper import Pruned, job_trial

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | Pruned:
    """Check the config, build what it names, train, and return the optimised metric's value
    at the best epoch (what a Hydra sweeper such as optuna optimises).

    In a pruned search (hydra/sweeper=optuna_pruning) the job reports that value to its
    trial after every epoch; when the trial's pruner stops it, it returns Pruned instead.

    With trainer.resume, or started again in a folder that holds a checkpoint (a requeued
    SLURM job), continue the run in its own folder from its last checkpoint. Under
    DDP (trainer.strategy=ddp) this runs in every process; rank 0 keeps the records.
    """
    settings = preflight.check(cfg)
    ranks = distributed.setup(settings.trainer.strategy, resolve_device(settings.trainer.device))
    job = HydraConfig.get()
    # The other ranks' Hydra folders are throwaway ones (run_folders): use rank 0's.
    run_dir = Path(distributed.broadcast(job.runtime.output_dir))
    resumed = None
    if resume.continues(cfg, run_dir):
        resumed = resume.load(cfg, run_dir, list(job.overrides.task), dict(job.runtime.choices))
        cfg, settings = resumed.config, preflight.check(resumed.config)
    seed_everything(settings.seed, settings.trainer.deterministic)
    built = build(cfg, settings, ranks, resumed)
    trial = job_trial()
    with RunRecord.open(run_dir, cfg, settings, built, resumed, ranks.is_main, trial) as record:
        if resumed:
            resumed.restore_rng()  # last: building the run drew random numbers
        with signals.stop_on_signals():
            fit(built.learner, built.loaders, LoopOptions.of(settings), record)
        if record.pruned:
            record.end_pruned()
            return Pruned(step=record.history[-1]["epoch"])
        results = record.finish()
    return results[f"best_{settings.optimized_metric}"]


@hydra.main(config_path=CONF_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | Pruned:
    try:
        return run_job(train, cfg)
    finally:
        distributed.teardown()


def cli() -> None:
    """The command (cifar-train): the extras the command line needs, then Hydra's `main`."""
    with exit_on_user_error():
        require_extras(sys.argv[1:])
    main()


if __name__ == "__main__":
    # Call `main` from the module by its import name, not as __main__: launchers that run the
    # jobs in other processes (joblib, submitit) pickle the task by reference to its module.
    from cifar_exp.train import cli as importable_cli

    importable_cli()
