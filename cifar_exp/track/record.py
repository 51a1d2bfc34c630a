"""The run record: the one writer of a run folder's files, and of the same to its W&B run
(through its `Tracker`).

    metrics.jsonl      one JSON object per finished epoch (rewound to the checkpoint on resume)
    results.json       best and final scores, the epoch of the best and the metric that chose
                       it, parameters, receptive field, epochs, mean epoch time (every epoch)
    summary.txt        the network's torchinfo table, then the results
    graphs.png         loss and accuracy per epoch
    per_class.json     the best checkpoint's accuracy per class and confusion matrix (at the end)
    confusion.png      that confusion matrix
    checkpoints/       last.pt and best.pt every epoch; interrupted.pt on a stop signal
    profile.txt        with trainer.profile_steps: the profiled steps' operators by their time
    profile_trace.json and their timeline (Perfetto, chrome://tracing)

"Best" is decided here alone: the epoch with the best value of `trainer.monitor` (the lowest
loss or the highest accuracy; the earlier epoch on a tie), and with it whether the run stops
early (`trainer.early_stopping.patience` epochs after the best one). Under DDP every rank keeps
the history and rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from cifar_exp.engine import checkpoint, jobs, profiling, resume, signals
from cifar_exp.settings import SCORES, DataSettings, best_is_lowest, checked
from cifar_exp.track import plots
from cifar_exp.track.per_class import ClassView
from cifar_exp.track.tracker import Tracker, choice_tags, start_run

if TYPE_CHECKING:
    import torch

    from cifar_exp.engine.build import BuiltRun
    from cifar_exp.engine.learner import Learner
    from cifar_exp.engine.resume import Resumed
    from cifar_exp.settings import Settings

log = logging.getLogger(__name__)

METRICS, RESULTS, SUMMARY, GRAPHS = "metrics.jsonl", "results.json", "summary.txt", "graphs.png"
PROFILE, TRACE = "profile.txt", "profile_trace.json"
CHECKPOINTS = Path("checkpoints")


def best_epoch(history: list[dict], metric: str) -> dict:
    """The epoch's metrics with the best value of `metric`; the earlier epoch on a tie."""
    pick = min if best_is_lowest(metric) else max
    return pick(history, key=lambda m: m[metric])


def configuration_id(config: dict) -> str:
    """What runs that differ only in seed, or in where and how they run (conf/train.yaml's
    runtime_keys), share: a stable hash of the config without those keys, its targets named
    as today (so a run of an earlier version shares its id with today's runs of its config)."""
    config = checkpoint.migrate(config)
    kept = resume.experiment(config, [*config.get("runtime_keys", []), "seed"])
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rewind_metrics(metrics_file: Path, epoch: int, rewrite: bool = True) -> list[dict]:
    """The metrics of epochs 1..epoch (the checkpoint's), with later or partial lines dropped
    from the file too when `rewrite`.

    A run killed after writing an epoch's metrics but before its checkpoint, or in the
    middle of a line, would otherwise get that epoch twice.
    """
    if not metrics_file.is_file():
        return []
    kept = []
    for line in metrics_file.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            break  # a partial last line
        if record.get("epoch") == len(kept) + 1 <= epoch:
            kept.append(record)
    if rewrite:
        write_atomically(metrics_file, "".join(json.dumps(m) + "\n" for m in kept))
    return kept


@dataclass(frozen=True)
class RunFacts:
    """What the record states about a run besides its epochs."""

    monitor: str = "test_acc"  # the metric that chooses checkpoints/best.pt
    optimized_metric: str = "test_acc"  # what the run returns to a sweeper
    epochs: int = 1  # the last epoch to train
    params: int = 0
    receptive_field: int = 0
    config: dict | None = None  # the resolved config, kept in every checkpoint
    classes: tuple[str, ...] = ()
    configuration_id: str = ""  # shared by the runs that differ only in seed or runtime keys
    tags: tuple[str, ...] = ()  # the W&B run's tags (kept in checkpoints for a resumed run)
    patience: int | None = None  # epochs after the best one before the run stops; None: never


class RunRecord:
    """Keeps a run's epochs and writes its folder (see the module's docstring)."""

    def __init__(
        self,
        run_dir: Path,
        facts: RunFacts,
        tracker: Tracker,
        *,
        done_epochs: int = 0,
        history: list[dict] | None = None,
        writes: bool = True,
    ) -> None:
        self.run_dir, self.facts, self.tracker, self.writes = run_dir, facts, tracker, writes
        self.next_epoch = done_epochs + 1
        self.history = list(history or [])
        if writes:
            run_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        run_dir: Path,
        cfg: DictConfig,
        settings: Settings,
        built: BuiltRun,
        resumed: Resumed | None = None,
        writes: bool = True,
    ) -> Iterator[RunRecord]:
        """The record of the run that `cfg` configures and `built` holds, continuing the
        `resumed` one if given, with its W&B run open for the block (marked failed if the
        block raises)."""
        config = OmegaConf.to_container(cfg, resolve=True)
        config_id = configuration_id(config)
        # A resumed run keeps its tags: this command's Hydra choices are not the run's.
        tags = resumed.wandb_tags if resumed else choice_tags()
        facts = RunFacts(
            monitor=settings.trainer.monitor,
            optimized_metric=settings.optimized_metric,
            epochs=settings.trainer.epochs,
            params=built.params,
            receptive_field=built.receptive_field,
            config=config,
            classes=built.classes,
            configuration_id=config_id,
            tags=(*dict.fromkeys([*tags, f"config:{config_id}"]),),
            patience=settings.trainer.early_stopping.patience,
        )
        done = resumed.epoch if resumed else 0
        history = rewind_metrics(run_dir / METRICS, done, rewrite=writes) if resumed else []
        if jobs.first_job():  # the same table for every job of a sweep: summary.txt keeps it
            log.info("Model:\n%s", built.summary)
        log.info(
            "%s; %d training and %d test images; run folder %s",
            built.learner.compute, *built.sizes, run_dir,
        )  # fmt: skip
        quiet = {"mode": "disabled", "tensorboard": False}  # the ranks that write nothing
        logger_cfg = cfg.logger if writes else OmegaConf.merge(cfg.logger, quiet)
        run_id = resumed.wandb_run_id if resumed else None
        with start_run(
            logger_cfg,
            run_dir,
            {**facts.config, "configuration_id": config_id},
            run_id=run_id,
            tags=list(facts.tags),
        ) as tracker:
            tracker.define_metrics(facts.optimized_metric)
            tracker.summary.update(
                {"params": facts.params, "receptive_field": facts.receptive_field}
            )
            record = cls(run_dir, facts, tracker, done_epochs=done, history=history, writes=writes)
            if writes:
                (run_dir / SUMMARY).write_text(built.summary + "\n")
            yield record

    @property
    def best(self) -> dict:
        return best_epoch(self.history, self.facts.monitor)

    @property
    def stops_early(self) -> bool:
        """Whether the run is over before its last epoch: `patience` epochs have passed since
        the best one."""
        patience, last = self.facts.patience, self.history[-1:]
        return bool(patience and last) and (
            self.best["epoch"] + patience <= last[0]["epoch"] < self.facts.epochs
        )

    def end_epoch(self, metrics: dict, learner: Learner) -> None:
        """Keep a finished epoch: its metrics line, its log, last.pt, and best.pt if it is the
        best epoch so far."""
        self.history.append(metrics)
        if not self.writes:
            return
        with (self.run_dir / METRICS).open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        results = self.results()
        swept = f"best_{self.facts.optimized_metric}"  # the W&B sweep files' metric
        self.tracker.log({**metrics, swept: results[swept]}, step=metrics["epoch"])
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.3g  %.1fs",
            metrics["epoch"], self.facts.epochs, metrics["train_loss"], metrics["train_acc"],
            metrics["test_loss"], metrics["test_acc"], metrics["lr"], metrics["epoch_seconds"],
        )  # fmt: skip
        state = self.checkpoint(learner, epoch=metrics["epoch"], metrics=metrics)
        checkpoint.save(state, self.run_dir / CHECKPOINTS / "last.pt")
        if self.best is metrics:
            checkpoint.save(state, self.run_dir / CHECKPOINTS / "best.pt")
        self.publish(results)
        if self.stops_early:
            log.info(
                "Stopping early: %s has not improved for %d epochs since epoch %d "
                "(trainer.early_stopping.patience=%d)",
                self.facts.monitor, metrics["epoch"] - self.best["epoch"], self.best["epoch"],
                self.facts.patience,
            )  # fmt: skip

    def publish(self, results: dict[str, Any]) -> None:
        """The results so far into results.json and the W&B summary (every epoch, so a run
        that stops early has its best values in both)."""
        write_atomically(self.run_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        self.tracker.summary.update(results)

    def keep_interrupted(self, learner: Learner, stop: signals.Interrupted) -> None:
        """The weights when a stop signal came mid-epoch, for a look; resuming restarts that
        epoch from last.pt."""
        if not self.writes:
            return
        state = self.checkpoint(learner, epoch=stop.epoch, step=stop.step)
        checkpoint.save(state, self.run_dir / CHECKPOINTS / "interrupted.pt")
        log.warning(
            "%s. Weights so far: checkpoints/interrupted.pt. Continue with "
            "trainer.resume=%s (restarts epoch %d)",
            stop, self.run_dir, stop.epoch,
        )  # fmt: skip

    def keep_profile(self, profiler: torch.profiler.profile) -> None:
        """The profiled training steps: operators by their own time, and the timeline."""
        if not self.writes:
            return
        (self.run_dir / PROFILE).write_text(profiling.operator_table(profiler) + "\n")
        profiler.export_chrome_trace(str(self.run_dir / TRACE))
        log.info(
            "Profiled %d training steps: %s (operators by time), %s (open in "
            "https://ui.perfetto.dev)",
            profiler.step_num - profiling.SKIPPED - profiling.WARMUP, PROFILE, TRACE,
        )  # fmt: skip

    def checkpoint(self, learner: Learner, **position: Any) -> dict:
        """A checkpoint of the learner at `position` (epoch, and step or metrics), with the
        config, the classes, the W&B run id and the monitored metric's best so far."""
        best = {"metric": self.facts.monitor, "best_epoch": None, "best_value": None}
        if self.history:
            best.update(best_epoch=self.best["epoch"], best_value=self.best[self.facts.monitor])
        return checkpoint.capture(
            learner, **position, config=self.facts.config, classes=list(self.facts.classes),
            wandb_run_id=self.tracker.id, wandb_tags=list(self.facts.tags), monitor=best,
        )  # fmt: skip

    def results(self) -> dict[str, Any]:
        best, last = self.best, self.history[-1]
        return {
            "monitor": self.facts.monitor,
            "best_epoch": best["epoch"],
            **{f"best_{name}": best[name] for name in SCORES if name in best},
            "final_test_acc": last["test_acc"],
            "final_train_acc": last["train_acc"],
            "epochs": last["epoch"],
            "stopped_early": self.stops_early,
            "params": self.facts.params,
            "receptive_field": self.facts.receptive_field,
            "mean_epoch_seconds": statistics.fmean(m["epoch_seconds"] for m in self.history),
            "optimized_metric": self.facts.optimized_metric,
            "configuration_id": self.facts.configuration_id,
        }

    def class_view(self) -> ClassView:
        """The best checkpoint's per-class view of the run's test set."""
        state = checkpoint.load(self.run_dir / CHECKPOINTS / "best.pt")
        data_settings = checked(DataSettings, state["config"]["data"], key="data")
        device = state["config"]["trainer"]["device"]
        return ClassView.of_checkpoint(state, data_settings, device)

    def finish(self) -> dict[str, Any]:
        """The results, written to results.json, summary.txt and the W&B summary, with the
        curves, the best checkpoint's per-class view (per_class.json, confusion.png, W&B
        panels) and the best checkpoint as a W&B artifact."""
        results = self.results()
        if self.writes:
            self.publish(results)
            with (self.run_dir / SUMMARY).open("a") as f:
                f.write("\nResults\n" + "".join(f"  {k}: {v}\n" for k, v in results.items()))
            graphs = plots.plot_curves(self.history, self.run_dir / GRAPHS)
            view = self.class_view()
            view.write(self.run_dir)
            self.tracker.log_class_view(view)
            self.tracker.log_results(results, graphs, self.run_dir / CHECKPOINTS / "best.pt")
        log.info(
            "Best %s %.4f at epoch %d (test accuracy %.4f), final test accuracy %.4f. "
            "Run folder: %s",
            results["monitor"], results[f"best_{results['monitor']}"], results["best_epoch"],
            results["best_test_acc"], results["final_test_acc"], self.run_dir,
        )  # fmt: skip
        name = self.facts.optimized_metric
        log.info("Optimised metric: best %s %.4f", name, results[f"best_{name}"])
        return results
