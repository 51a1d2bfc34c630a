"""The run record: the one writer of a run folder's files, and of the same to its W&B run
(through its `Tracker`).

    metrics.jsonl      one JSON object per finished epoch (rewritten from the checkpoint on
                       resume; a damaged line is set aside in metrics.damaged.jsonl)
    results.json       the run's state (running, stopped, failed, finished), best and final
                       scores, the epoch of the best and the metric that chose it, parameters,
                       receptive field, epochs, mean epoch time (at the start and every epoch)
    summary.txt        the network's torchinfo table, then the results
    config_tree.log    the config as a tree (also printed by a single run or a sweep's first job)
    graphs.png         loss and accuracy per epoch
    per_class.json     the best checkpoint's accuracy per class and confusion matrix (at the end)
    confusion.png      that confusion matrix
    checkpoints/       last.pt (from the start: epoch 0) and best.pt every epoch; interrupted.pt
                       on a stop signal
    profile.txt        with trainer.profile_steps: the profiled steps' operators by their time
    profile_trace.json and their timeline (Perfetto, chrome://tracing)

Every file is written whole or not at all (`files`). An epoch is committed by last.pt, which
holds the history of every epoch so far: the files written before it (metrics.jsonl) or after
it (best.pt, results.json) are brought in line with it when the run resumes (`repair`), so a
run killed at any instant resumes to the same files and weights as a run left alone.

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
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from cifar_exp import distributed, files
from cifar_exp.engine import checkpoint, jobs, profiling, resume, signals
from cifar_exp.settings import SCORES, DataSettings, best_is_lowest, checked
from cifar_exp.track import plots
from cifar_exp.track.config_tree import CONFIG_TREE, as_text, config_tree
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
DAMAGED_METRICS = "metrics.damaged.jsonl"
PROFILE, TRACE = "profile.txt", "profile_trace.json"
CHECKPOINTS = Path("checkpoints")
LAST, BEST = CHECKPOINTS / "last.pt", CHECKPOINTS / "best.pt"
# results.json's "state": what the run is doing, or how it ended.
RUNNING, STOPPED, FAILED, FINISHED = "running", "stopped", "failed", "finished"
PRUNED = "pruned"  # stopped by a search's pruner (hydra/sweeper=optuna_pruning)
PRUNED_TAG = "pruned"  # the W&B tag of a pruned run


class Trial(Protocol):
    """A search trial that the run reports to after every epoch, and whose pruner may stop
    it: the optuna.trial.Trial that hydra_plugins/optuna_pruning_sweeper hands a search's job
    (typed here by what the record asks of it, so the core needs no Optuna)."""

    number: int

    def report(self, value: float, step: int) -> None: ...

    def should_prune(self) -> bool: ...


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


def read_metrics(metrics_file: Path) -> tuple[list[dict], list[str]]:
    """metrics.jsonl's epochs, and the lines that are not a JSON object of an epoch (a line
    cut short by a crash, or damaged since): those are skipped, never a reason to drop the
    lines after them."""
    epochs, damaged = [], []
    lines = metrics_file.read_text(errors="replace").splitlines() if metrics_file.is_file() else []
    for line in filter(str.strip, lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            epochs.append(record)
        else:
            damaged.append(line)
    return epochs, damaged


def history_until(metrics_file: Path, epoch: int) -> list[dict]:
    """Epochs 1..epoch from metrics.jsonl: the history of a checkpoint written before
    checkpoints kept their own."""
    kept: list[dict] = []
    for record in read_metrics(metrics_file)[0]:
        if record["epoch"] == len(kept) + 1 <= epoch:
            kept.append(record)
    return kept


def epochs_kept(run_dir: Path) -> int:
    """How many epochs the run in `run_dir` has committed with their checkpoints, as its
    results.json says (written after them); 0 before the first, or while it is unreadable."""
    try:
        return json.loads((run_dir / RESULTS).read_text())["epochs"]
    except (OSError, ValueError, KeyError):
        return 0


def metrics_lines(history: list[dict]) -> str:
    return "".join(json.dumps(m) + "\n" for m in history)


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
    network: str = ""  # the network's torchinfo table, summary.txt's first part
    config_tree: str = ""  # the config as config_tree.log holds it
    label_smoothing: float = 0.0  # of the training loss: its floor at 100% training accuracy
    num_classes: int = 10


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
        trial: Trial | None = None,
    ) -> None:
        self.run_dir, self.facts, self.tracker, self.writes = run_dir, facts, tracker, writes
        self.trial = trial
        self.pruned = False  # whether the trial's pruner stopped the run
        self.ended_as: str | None = None  # the state the run ended in before `finish`
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
        trial: Trial | None = None,
    ) -> Iterator[RunRecord]:
        """The record of the run that `cfg` configures and `built` holds, continuing the
        `resumed` one if given, with its W&B run open for the block (marked failed if the
        block raises). A new run's folder gets its first checkpoint (epoch 0) here, so that
        from now on the run can be resumed whenever it dies; a resumed run's folder is
        repaired first. results.json says how the block ended. A search `trial` is told
        every epoch's value and may stop the run (`pruned`)."""
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
            network=built.summary,
            config_tree=as_text(tree := config_tree(cfg)),
            label_smoothing=settings.trainer.label_smoothing,
            num_classes=settings.model.num_classes,
        )
        if jobs.first_job():  # the same for every job of a sweep: the run folder keeps them
            Console().print(tree)
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
            history = resumed_history(resumed, run_dir / METRICS) if resumed else []
            done = resumed.epoch if resumed else 0
            record = cls(
                run_dir, facts, tracker, done_epochs=done, history=history, writes=writes,
                trial=trial,
            )  # fmt: skip
            if writes:
                record.start(built.learner, resumed)
            try:
                yield record
            except BaseException as err:
                if record.ended_as is None:  # not a stop signal's (keep_interrupted)
                    record.end_as(FAILED, error=(str(err).strip().splitlines() or [repr(err)])[0])
                raise

    def start(self, learner: Learner, resumed: Resumed | None) -> None:
        """The folder at the start: a new run's first checkpoint, or a resumed run's folder
        repaired; summary.txt's network table; results.json with the state running. Temporary
        files that a killed write left are removed first."""
        files.remove_leftovers(self.run_dir, self.run_dir / CHECKPOINTS)
        if resumed:
            self.repair(resumed)
        else:
            checkpoint.save(self.checkpoint(learner, epoch=0), self.run_dir / LAST)
        files.write_atomically(self.run_dir / SUMMARY, self.facts.network + "\n")
        files.write_atomically(self.run_dir / CONFIG_TREE, self.facts.config_tree)
        self.publish(self.results(RUNNING))

    def repair(self, resumed: Resumed) -> None:
        """Bring the folder in line with the checkpoint the run resumes from, whatever instant
        the run died at: metrics.jsonl rewritten from the checkpoint's history (any damaged
        line set aside in metrics.damaged.jsonl, and said), and best.pt rewritten when the
        checkpoint's own epoch is the best one and the run died before best.pt was written."""
        metrics_file = self.run_dir / METRICS
        _, damaged = read_metrics(metrics_file)
        for line in damaged:
            files.append_line(self.run_dir / DAMAGED_METRICS, line)
        if damaged:
            log.warning(
                "%d damaged line(s) of %s set aside in %s; the epochs come from %s",
                len(damaged), metrics_file, DAMAGED_METRICS, resumed.path,
            )  # fmt: skip
        files.write_atomically(metrics_file, metrics_lines(self.history))
        best, saved = self.best["epoch"] if self.history else None, saved_epoch(self.run_dir / BEST)
        if best == resumed.epoch != saved:
            log.info("Writing %s from %s: its epoch %d is the best", BEST, resumed.path, best)
            files.write_atomically(self.run_dir / BEST, resumed.path.read_bytes())
        elif best != saved:
            log.warning(
                "%s holds epoch %s, not the best epoch %s, whose weights are lost (the file was "
                "damaged or removed); a later epoch that beats it writes %s again",
                BEST, saved, best, BEST,
            )  # fmt: skip

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
        """Keep a finished epoch: its metrics line, its log, last.pt (which commits the
        epoch), best.pt if it is the best epoch so far (after last.pt: a run that dies between
        the two has the best weights in last.pt, and `repair` copies them), results.json.
        Then a search trial is told the epoch, and its pruner may stop the run."""
        self.history.append(metrics)
        if self.writes:
            self.keep_epoch(metrics, learner)
        if self.trial is not None:
            # Rank 0 reports and asks; under DDP every rank stops with it.
            self.pruned = bool(distributed.broadcast(self.writes and self.trial_prunes()))

    def keep_epoch(self, metrics: dict, learner: Learner) -> None:
        """The epoch's files, log line and W&B step (the process that writes: rank 0)."""
        files.append_line(self.run_dir / METRICS, json.dumps(metrics))
        results = self.results(RUNNING)
        swept = f"best_{self.facts.optimized_metric}"  # the W&B sweep files' metric
        self.tracker.log({**metrics, swept: results[swept]}, step=metrics["epoch"])
        log.info(
            "epoch %d/%d  train loss %.4f acc %.4f  test loss %.4f acc %.4f  lr %.3g  %.1fs",
            metrics["epoch"], self.facts.epochs, metrics["train_loss"], metrics["train_acc"],
            metrics["test_loss"], metrics["test_acc"], metrics["lr"], metrics["epoch_seconds"],
        )  # fmt: skip
        state = self.checkpoint(learner, epoch=metrics["epoch"])
        checkpoint.save(state, self.run_dir / LAST)
        if self.best is metrics:
            checkpoint.save(state, self.run_dir / BEST)
        self.publish(results)
        if self.stops_early:
            log.info(
                "Stopping early: %s has not improved for %d epochs since epoch %d "
                "(trainer.early_stopping.patience=%d)",
                self.facts.monitor, metrics["epoch"] - self.best["epoch"], self.best["epoch"],
                self.facts.patience,
            )  # fmt: skip

    def trial_prunes(self) -> bool:
        """Report the value the run would return now (the optimised metric at the best epoch
        so far, which only improves) to the search trial as the epoch's, and whether the
        trial's pruner stops the run here. The last epoch, or one after which the run stops
        early anyway, is reported but not judged: a finished trial tells the sampler more."""
        assert self.trial is not None
        epoch = self.history[-1]["epoch"]
        self.trial.report(self.best[self.facts.optimized_metric], epoch)
        return epoch < self.facts.epochs and not self.stops_early and self.trial.should_prune()

    def end_pruned(self) -> None:
        """The run's end when the search's pruner stopped it: results.json's state pruned
        (with the epochs trained) and the W&B run tagged."""
        assert self.trial is not None
        name, epoch = self.facts.optimized_metric, self.history[-1]["epoch"]
        log.info(
            "Pruned by the search after epoch %d/%d (trial %d): best %s %.4f so far is behind "
            "the other trials'. Run folder: %s",
            epoch, self.facts.epochs, self.trial.number, name,
            self.best[name], self.run_dir,
        )  # fmt: skip
        if self.writes:
            self.tracker.add_tags(PRUNED_TAG)
        self.end_as(PRUNED)

    def publish(self, results: dict[str, Any]) -> None:
        """The results so far into results.json and the W&B summary (every epoch, so a run
        that stops early has its best values in both)."""
        files.write_atomically(self.run_dir / RESULTS, json.dumps(results, indent=2) + "\n")
        self.tracker.summary.update(results)

    def end_as(self, state: str, **details: Any) -> None:
        """results.json's state when the run ends before `finish` (stopped or failed). A
        write that fails here is logged, not raised: the error that ended the run matters."""
        self.ended_as = state
        if not self.writes:
            return
        try:
            self.publish({**self.results(state), **details})
        except files.WriteFailed as err:
            log.warning("The run's state (%s) was not recorded: %s", state, err)

    def keep_interrupted(self, learner: Learner, stop: signals.Interrupted) -> None:
        """The weights when a stop signal came mid-epoch, for a look (resuming restarts that
        epoch from last.pt), and the state stopped."""
        if self.writes:
            state = self.checkpoint(learner, epoch=stop.epoch, step=stop.step)
            checkpoint.save(state, self.run_dir / CHECKPOINTS / "interrupted.pt")
            log.warning(
                "%s. Weights so far: checkpoints/interrupted.pt. Continue with "
                "trainer.resume=%s (restarts epoch %d)",
                stop, self.run_dir, stop.epoch,
            )  # fmt: skip
        self.end_as(STOPPED)

    def keep_profile(self, profiler: torch.profiler.profile) -> None:
        """The profiled training steps: operators by their own time, and the timeline."""
        if not self.writes:
            return
        files.write_atomically(self.run_dir / PROFILE, profiling.operator_table(profiler) + "\n")
        trace = self.run_dir / TRACE
        profiler.export_chrome_trace(str(files.tmp_path(trace)))
        files.tmp_path(trace).replace(trace)
        log.info(
            "Profiled %d training steps: %s (operators by time), %s (open in "
            "https://ui.perfetto.dev)",
            profiler.step_num - profiling.SKIPPED - profiling.WARMUP, PROFILE, TRACE,
        )  # fmt: skip

    def checkpoint(self, learner: Learner, **position: Any) -> dict:
        """A checkpoint of the learner at `position` (epoch, and step for a stop mid-epoch),
        with the history of the epochs so far, the config, the classes, the W&B run id and the
        monitored metric's best so far."""
        best = {"metric": self.facts.monitor, "best_epoch": None, "best_value": None}
        if self.history:
            best.update(best_epoch=self.best["epoch"], best_value=self.best[self.facts.monitor])
        return checkpoint.capture(
            learner, **position, history=list(self.history), config=self.facts.config,
            classes=list(self.facts.classes), wandb_run_id=self.tracker.id,
            wandb_tags=list(self.facts.tags), monitor=best,
        )  # fmt: skip

    def results(self, state: str) -> dict[str, Any]:
        """results.json: the run's state and facts, and its scores once it has an epoch."""
        facts = {
            "state": state,
            "monitor": self.facts.monitor,
            "epochs": len(self.history),
            "planned_epochs": self.facts.epochs,
            "params": self.facts.params,
            "receptive_field": self.facts.receptive_field,
            "optimized_metric": self.facts.optimized_metric,
            "configuration_id": self.facts.configuration_id,
        }
        if not self.history:
            return facts
        best, last = self.best, self.history[-1]
        return {
            **facts,
            "best_epoch": best["epoch"],
            **{f"best_{name}": best[name] for name in SCORES if name in best},
            "final_test_acc": last["test_acc"],
            "final_train_acc": last["train_acc"],
            "stopped_early": self.stops_early,
            "mean_epoch_seconds": statistics.fmean(m["epoch_seconds"] for m in self.history),
        }

    def class_view(self) -> ClassView:
        """The best checkpoint's per-class view of the run's test set."""
        state = checkpoint.load(self.run_dir / BEST)
        data_settings = checked(DataSettings, state["config"]["data"], key="data")
        device = state["config"]["trainer"]["device"]
        return ClassView.of_checkpoint(state, data_settings, device)

    def finish(self) -> dict[str, Any]:
        """The results, with the curves, the best checkpoint's per-class view (per_class.json,
        confusion.png, W&B panels), summary.txt and the best checkpoint as a W&B artifact;
        results.json last, whose state `finished` says all of them are written."""
        results = self.results(FINISHED)
        if self.writes:
            graphs = plots.plot_curves(self.history, self.run_dir / GRAPHS)
            view = self.class_view()
            view.write(self.run_dir)
            self.tracker.log_class_view(view)
            files.write_atomically(
                self.run_dir / SUMMARY,
                self.facts.network + "\n\nResults\n"
                + "".join(f"  {k}: {v}\n" for k, v in results.items()),
            )  # fmt: skip
            self.tracker.log_results(results, graphs, self.run_dir / BEST)
            self.publish(results)
        log.info(
            "Best %s %.4f at epoch %d (test accuracy %.4f), final test accuracy %.4f. "
            "Run folder: %s",
            results["monitor"], results[f"best_{results['monitor']}"], results["best_epoch"],
            results["best_test_acc"], results["final_test_acc"], self.run_dir,
        )  # fmt: skip
        name = self.facts.optimized_metric
        log.info("Optimised metric: best %s %.4f", name, results[f"best_{name}"])
        if note := smoothing_note(
            self.facts.label_smoothing, self.facts.num_classes, self.history[-1]
        ):
            log.info("%s", note)
        return results


def smoothing_note(smoothing: float, classes: int, last: dict) -> str | None:
    """A line for a training loss that stays high at (nearly) 100% training accuracy because
    label smoothing keeps it there (debug=overfit); None otherwise."""
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


def resumed_history(resumed: Resumed, metrics_file: Path) -> list[dict]:
    """The epochs a resumed run has kept: its checkpoint's history (metrics.jsonl for a
    checkpoint of a version that did not keep one)."""
    if "history" in resumed.state:
        return resumed.state["history"]
    return history_until(metrics_file, resumed.epoch)


def saved_epoch(path: Path) -> int | None:
    """The epoch of the checkpoint at `path`; None if there is none, or it is damaged."""
    try:
        return checkpoint.load(path, option="checkpoint")["epoch"]
    except checkpoint.CheckpointError:
        return None
