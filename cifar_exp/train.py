"""`python -m cifar_exp.train [overrides]`: train the configured model, one run per Hydra job."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
import torchinfo
import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from cifar_exp import (
    augment,
    budget,
    checkpoint,
    data,
    distributed,
    interrupt,
    models,
    plots,
    run_folders,
    tracking,
)
from cifar_exp.errors import UserError, run_job
from cifar_exp.runner import (
    EPOCH_METRICS,
    VAL_METRICS,
    Compute,
    fit,
    resolve_compute,
    resolve_device,
    seed_everything,
)
from cifar_exp.validation import validate

log = logging.getLogger(__name__)

# Sweep subfolders are named by their overrides; "/" in a group override (model/norm=group)
# would nest folders.
OmegaConf.register_new_resolver("path_safe", lambda text: text.replace("/", "-"), replace=True)


def call_factory(key: str, factory: Callable, *args: Any, **kwargs: Any) -> Any:
    """Call a `_partial_` object from the config; a value it rejects becomes a UserError."""
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise UserError(f"{key}: {factory.func.__qualname__} rejected its config: {err}") from err


def build_scheduler(scheduler_cfg: DictConfig, optimizer: Any, steps_per_epoch: int) -> Any:
    """The configured LR scheduler; per-batch ones (OneCycle) also get the batches per epoch."""
    step_args = {"steps_per_epoch": steps_per_epoch} if scheduler_cfg.interval == "step" else {}
    factory = instantiate(scheduler_cfg.lr_scheduler)
    return call_factory("scheduler.lr_scheduler", factory, optimizer, **step_args)


def resumed_config(cfg: DictConfig, saved: dict) -> DictConfig:
    """The resumed run's saved config, with where it runs (data location, device, ...) as given
    on the command line."""
    hydra_cfg = HydraConfig.get()
    given = run_folders.overridden(list(hydra_cfg.overrides.task))
    resumed = OmegaConf.create(saved)
    for key in set(run_folders.where_it_runs(hydra_cfg)) & set(given):
        value = OmegaConf.select(cfg, key, default=None)
        if not OmegaConf.is_config(value):  # a key, not a group such as debug
            OmegaConf.update(resumed, key, value, force_add=True)
    return resumed


@dataclass
class Training:
    """Everything the config names, built and ready for the training loop."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_loader: Iterable
    test_loader: Iterable
    compute: Compute
    classes: tuple[str, ...]
    sizes: tuple[int, int]  # training and test images
    num_params: int
    receptive_field: int
    val_loader: Iterable | None = None  # images held out of the training set (data.val_size)


def build(cfg: DictConfig, resumed: dict | None = None, ckpt_path: Path | None = None) -> Training:
    """Model, optimizer, data, scheduler and compute options from the config.

    Config checks, model (with the `resumed` checkpoint's weights) and optimizer come first: a
    bad value or a checkpoint of another model fails before the data is loaded.
    """
    validate(cfg)
    metric_names = EPOCH_METRICS + (VAL_METRICS if cfg.data.get("val_size") else ())
    for key in ("scheduler.monitor", "optimized_metric"):
        if OmegaConf.select(cfg, key) not in (None, *metric_names):
            raise UserError(
                f"{key}={OmegaConf.select(cfg, key)} is not a metric of this run; choose one of "
                f"{', '.join(metric_names)} (val_* need data.val_size)"
            )
    trainer, ranks = cfg.trainer, distributed.current()
    if cfg.data.batch_size % ranks.world_size:
        raise UserError(
            f"data.batch_size={cfg.data.batch_size} is the batch of all {ranks.world_size} "
            "processes together; make it a multiple of their number"
        )
    device = distributed.rank_device(resolve_device(trainer.device), ranks)
    compute = resolve_compute(device, trainer)
    if trainer.threads:
        torch.set_num_threads(trainer.threads)
    model = models.build(cfg.model)
    num_params, rf = budget.count_parameters(model), budget.receptive_field(model)
    log.info("Model: %s parameters, receptive field %d pixels", f"{num_params:,}", rf)
    budget.check(num_params, rf, cfg.model.get("max_params"), cfg.model.get("min_rf"))
    if trainer.get("sync_batchnorm") and ranks.world_size > 1:
        model = distributed.sync_batchnorm(model, device)
    optimizer = call_factory("optimizer", instantiate(cfg.optimizer), model.parameters())
    if resumed:
        checkpoint.restore_model(resumed, model, ckpt_path)

    train_set, test_set = data.load(cfg.data, "train"), data.load(cfg.data, "test")
    if train_set.classes != test_set.classes:
        missing = set(train_set.classes) ^ set(test_set.classes)
        raise UserError(
            f"train and test classes differ (only in one split: {', '.join(sorted(missing))}); "
            "each class needs a folder in both data.root/train and data.root/test"
        )
    num_classes = cfg.model.get("num_classes")
    if num_classes is not None and len(train_set.classes) != num_classes:
        raise UserError(
            f"the data has {len(train_set.classes)} classes ({', '.join(train_set.classes)}) "
            f"but model.num_classes={num_classes}; add the missing class folders or set "
            "model.num_classes"
        )
    val_set = None
    if cfg.data.get("val_size"):
        train_set, val_set = data.hold_out(train_set, cfg.data.val_size, cfg.data.val_seed)
    train_augment = instantiate(cfg.augment)
    test_augment = augment.plain(train_augment, cfg.data.mean, cfg.data.std)
    loader_args = dict(
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        device=compute.device,
    )
    train_loader = data.make_loader(
        train_set, train_augment, shuffle=True, ranks=ranks, **loader_args
    )
    test_loader = data.make_loader(test_set, test_augment, shuffle=False, **loader_args)
    val_loader = None
    if val_set is not None:
        val_loader = data.make_loader(val_set, test_augment, shuffle=False, **loader_args)
    scheduler = build_scheduler(cfg.scheduler, optimizer, steps_per_epoch=len(train_loader))
    sizes = (len(train_set.labels), len(test_set.labels))
    return Training(
        model, optimizer, scheduler, train_loader, test_loader, compute, train_set.classes, sizes,
        num_params, rf, val_loader,
    )  # fmt: skip


def optimized_metric(cfg: DictConfig) -> str:
    """What a sweeper optimises: `optimized_metric`, else val_acc with a validation set, else
    test_acc (never the test set when searching: hparams_search sets data.val_size)."""
    return cfg.get("optimized_metric") or ("val_acc" if cfg.data.get("val_size") else "test_acc")


def best_value(history: list[dict], metric: str) -> float:
    """The best value of `metric` over the epochs: the lowest loss, the highest anything else."""
    values = [m[metric] for m in history]
    return min(values) if metric.endswith("loss") else max(values)


def train(cfg: DictConfig) -> float:
    """Build everything the config names, train, and return the best value of the optimised
    metric (`optimized_metric`): what a Hydra sweeper (optuna) optimises.

    With trainer.resume, continue the run in its own folder from its last checkpoint. Under
    DDP (trainer.strategy=ddp) this runs in every process; rank 0 keeps the records.
    """
    ranks = distributed.setup(cfg.trainer.strategy, resolve_device(cfg.trainer.device))
    # The other ranks' Hydra folders are throwaway ones (run_folders): use rank 0's.
    run_dir = Path(distributed.broadcast(HydraConfig.get().runtime.output_dir))
    resumed, ckpt_path = None, None
    if cfg.trainer.resume:
        ckpt_path = run_folders.checkpoint_path(cfg.trainer.resume, run_dir)
        resumed = checkpoint.load(ckpt_path)
        if "step" in resumed:
            raise checkpoint.CheckpointError(
                f"trainer.resume={ckpt_path} holds mid-epoch weights saved on a stop signal; "
                f"resume from the run folder (its checkpoints/last.pt) instead"
            )
        cfg = resumed_config(cfg, resumed["config"])
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    setup = build(cfg, resumed, ckpt_path)
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    scaler = setup.compute.grad_scaler()
    history, start_epoch, best_test_acc = [], 1, -1.0
    if resumed:
        if ranks.is_main:
            history = checkpoint.rewind_metrics(run_dir / "metrics.jsonl", resumed["epoch"])
        start_epoch, best_test_acc = resumed["epoch"] + 1, resumed["best_test_acc"]
        log.info("Resuming %s after epoch %d", run_dir, resumed["epoch"])

    model_summary = str(torchinfo.summary(model, input_size=(1, 3, 32, 32), verbose=0))
    log.info("Model:\n%s", model_summary)
    log.info(
        "%s; %d training and %d test images; run folder %s",
        setup.compute,
        *setup.sizes,
        run_dir,
    )
    summary_file = run_dir / "summary.txt"
    if ranks.is_main:
        summary_file.write_text(model_summary + "\n")

    config = OmegaConf.to_container(cfg, resolve=True)
    # The W&B run ends when the block does, marked failed if it raised.
    wandb_id = resumed.get("wandb_run_id") if resumed else None
    logger_cfg = cfg.logger if ranks.is_main else OmegaConf.merge(cfg.logger, {"mode": "disabled"})
    with tracking.start_run(logger_cfg, run_dir, config, run_id=wandb_id) as run:
        run.summary.update({"params": setup.num_params, "receptive_field": setup.receptive_field})
        extra = {"config": config, "classes": list(setup.classes), "wandb_run_id": run.id}
        if resumed:  # the saved random-number states, last: building the run used others
            checkpoint.restore_training(resumed, optimizer, scheduler, scaler)
        try:
            with interrupt.stop_on_signals():
                history += fit(
                    model,
                    optimizer,
                    scheduler,
                    setup.train_loader,
                    setup.test_loader,
                    epochs=cfg.trainer.epochs,
                    compute=setup.compute,
                    run_dir=run_dir,
                    tracker=run,
                    scheduler_interval=cfg.scheduler.interval,
                    scheduler_monitor=cfg.scheduler.monitor,
                    checkpoint_extra=extra,
                    progress=cfg.trainer.progress,
                    label_smoothing=cfg.trainer.label_smoothing,
                    start_epoch=start_epoch,
                    best_test_acc=best_test_acc,
                    seed=cfg.seed,
                    scaler=scaler,
                    val_loader=setup.val_loader,
                    test_flip=cfg.trainer.test_flip,
                )
        except interrupt.Interrupted as stop:
            # Mid-epoch weights, for a look; resuming restarts this epoch from last.pt.
            state = checkpoint.capture(
                model, optimizer, scheduler, epoch=stop.epoch, step=stop.step, scaler=scaler,
                best_test_acc=max([best_test_acc, *(m["test_acc"] for m in history)]), **extra,
            )  # fmt: skip
            if ranks.is_main:
                checkpoint.save(state, run_dir / "checkpoints" / "interrupted.pt")
            log.warning(
                "%s. Weights so far: checkpoints/interrupted.pt. Continue with "
                "trainer.resume=%s (restarts epoch %d)",
                stop, run_dir, stop.epoch,
            )  # fmt: skip
            raise SystemExit(stop.exit_code) from None
        best = max(history, key=lambda m: m["test_acc"])
        results = {
            "params": setup.num_params,
            "receptive_field": setup.receptive_field,
            "best_test_acc": best["test_acc"],
            "best_epoch": best["epoch"],
            "final_test_acc": history[-1]["test_acc"],
            "final_train_acc": history[-1]["train_acc"],
            "mean_epoch_seconds": sum(m["epoch_seconds"] for m in history) / len(history),
        }
        metric = optimized_metric(cfg)
        results[f"best_{metric}"] = best_value(history, metric)
        if ranks.is_main:
            with summary_file.open("a") as f:
                f.write("\nResults\n" + "".join(f"  {k}: {v}\n" for k, v in results.items()))
            graphs = plots.plot_curves(history, run_dir / "graphs.png")
            run.summary.update(results)
            run.log({"graphs": wandb.Image(str(graphs))})
            tracking.log_model(run, run_dir / "checkpoints" / "best.pt")
    log.info(
        "Best test accuracy %.4f (epoch %d), final %.4f. Run folder: %s",
        results["best_test_acc"],
        results["best_epoch"],
        results["final_test_acc"],
        run_dir,
    )
    log.info("Optimised metric: best %s %.4f", metric, results[f"best_{metric}"])
    return results[f"best_{metric}"]


# An absolute path: Hydra finds it whether this module runs as __main__ or is imported.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float:
    try:
        return run_job(train, cfg)
    finally:
        distributed.teardown()


if __name__ == "__main__":
    # Call `main` from the module by its import name, not as __main__: launchers that run the
    # jobs in other processes (joblib, submitit) pickle the task by reference to its module.
    from cifar_exp.train import main as importable_main

    importable_main()
