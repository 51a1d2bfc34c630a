"""`python -m cifar_exp.train [overrides]`: train the configured model, one run per Hydra job."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from cifar_exp import distributed
from cifar_exp.engine import preflight, resume, signals
from cifar_exp.engine.build import build
from cifar_exp.engine.compute import resolve_device, seed_everything
from cifar_exp.engine.jobs import first_job, require_extras, run_job
from cifar_exp.engine.loop import LoopOptions, fit
from cifar_exp.errors import exit_on_user_error
from cifar_exp.settings import CONF_PATH, Settings
from cifar_exp.track.config_tree import save_config_tree
from cifar_exp.track.record import RunRecord

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float:
    """Check the config, build what it names, train, and return the optimised metric's value
    at the best epoch (what a Hydra sweeper such as optuna optimises).

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
        resumed = resume.load(cfg, run_dir, list(job.overrides.task))
        cfg, settings = resumed.config, preflight.check(resumed.config)
    seed_everything(settings.seed, settings.trainer.deterministic)
    built = build(cfg, settings, ranks, resumed)
    if ranks.is_main:  # once the data is found: a refused run leaves only its log behind
        save_config_tree(cfg, run_dir, show=first_job())
    with RunRecord.open(run_dir, cfg, settings, built, resumed, ranks.is_main) as record:
        if resumed:
            resumed.restore_rng()  # last: building the run drew random numbers
        with signals.stop_on_signals():
            fit(built.learner, built.loaders, LoopOptions.of(settings), record)
        results = record.finish()
        if ranks.is_main and (note := smoothing_note(settings, record.history[-1])):
            log.info("%s", note)
    return results[f"best_{settings.optimized_metric}"]


def smoothing_note(settings: Settings, last: dict) -> str | None:
    """A line for a training loss that stays high at (nearly) 100% training accuracy because
    label smoothing keeps it there (debug=overfit); None otherwise."""
    smoothing, classes = settings.trainer.label_smoothing, settings.model.num_classes
    if not smoothing or last["train_acc"] < 0.99:
        return None
    # The loss of a perfect prediction: the entropy of the smoothed target distribution.
    right, wrong = 1 - smoothing + smoothing / classes, smoothing / classes
    floor = -right * math.log(right) - (classes - 1) * wrong * math.log(wrong)
    return (
        f"Training accuracy {100 * last['train_acc']:.1f}% with training loss "
        f"{last['train_loss']:.3f}: label smoothing (trainer.label_smoothing={smoothing}) "
        f"keeps even a perfect prediction's loss at {floor:.3f} or more"
    )


@hydra.main(config_path=CONF_PATH, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
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
