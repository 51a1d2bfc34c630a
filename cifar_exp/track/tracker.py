"""Weights & Biases, and TensorBoard beside it: the one module of the package that imports
either. A job's W&B run (`start_run`) comes back as a `Tracker`, through which the run record,
evaluate and report log everything they log; its files are kept inside the run folder."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import wandb
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cifar_exp.settings import SCORES, best_is_lowest

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from cifar_exp.track.per_class import ClassView


def keep_files_in(folder: Path) -> None:
    """Send W&B's cache, data, artifact staging and settings folders to folder/wandb."""
    wandb_dir = folder / "wandb"
    for variable, sub in (
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
        ("WANDB_ARTIFACT_DIR", "artifacts"),
        ("WANDB_CONFIG_DIR", "settings"),
    ):
        os.environ[variable] = str(wandb_dir / sub)
    wandb_dir.mkdir(parents=True, exist_ok=True)


# Config groups whose choice (from the command line or a preset) tags a run.
TAGGED_CHOICES = {"experiment": "experiment", "model": "model", "model/norm": "norm",
                  "augment": "augment"}  # fmt: skip


def choice_tags() -> list[str]:
    """Tags from this Hydra job's choices (experiment preset, model, norm, augmentation) and
    its search study, e.g. norm:group, study:cifar_exp."""
    hydra_cfg = HydraConfig.get()
    choices = hydra_cfg.runtime.choices
    tags = [
        f"{tag}:{choices[group]}" for group, tag in TAGGED_CHOICES.items() if choices.get(group)
    ]
    if choices.get("hparams_search"):
        tags.append(f"study:{hydra_cfg.sweeper.study_name}")
    return tags


TENSORBOARD = "tensorboard"  # the event files' folder in the run folder


@contextlib.contextmanager
def start_run(
    logger_cfg: DictConfig,
    run_dir: Path,
    config: dict[str, Any],
    run_id: str | None = None,
    tags: list[str] | None = None,
) -> Iterator[Tracker]:
    """The W&B run of this Hydra job (offline, online or disabled, as configured).

    It is named by the job's overrides and, in a multirun, grouped by the sweep. W&B's cache,
    data, artifact staging and settings folders go under run_dir/wandb, not the home folder.
    With `run_id` (a resumed run) the same W&B run continues. The run finishes when the block
    ends, with the exit code of an error or stop signal that ends it (W&B's own context
    manager would print a traceback for it). `tags` join the logger's own.
    """
    # A new W&B session for every job (a no-op for the first): W&B reads its folders' variables
    # when a session starts, and warns at every later job of a multirun that they changed.
    wandb.teardown()
    keep_files_in(run_dir)
    tensorboard = logger_cfg.get("tensorboard", False)
    logger_cfg = OmegaConf.masked_copy(logger_cfg, [k for k in logger_cfg if k != "tensorboard"])
    hydra_cfg = HydraConfig.get()
    name = logger_cfg.get("name") or hydra_cfg.job.override_dirname or None
    group = logger_cfg.get("group")
    if group is None and hydra_cfg.mode == RunMode.MULTIRUN:
        group = Path(hydra_cfg.sweep.dir).as_posix().replace("/", "-")
    # Partial: `config` is also the name of instantiate's own first argument.
    init = instantiate(logger_cfg, _partial_=True)
    resume = {"id": run_id, "resume": "allow"} if run_id else {}
    run = init(
        dir=str(run_dir),
        config=config,
        name=name,
        group=group,
        tags=[*logger_cfg.get("tags", []), *(tags or [])],
        reinit="finish_previous",  # one run per job, even inside a multirun process
        **resume,
    )
    writer = None
    if tensorboard:  # the tensorboard extra: preflight checked that it is installed
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run_dir / TENSORBOARD))
    try:
        yield Tracker(run, writer)
    except BaseException as err:
        code = err.code if isinstance(err, SystemExit) else getattr(err, "exit_code", 1)
        run.finish(exit_code=code if isinstance(code, int) else 1)
        raise
    finally:
        if writer:
            writer.close()
    run.finish()


# The results that describe a model artifact (its metadata), beside any best_* accuracy.
ARTIFACT_FACTS = ("best_epoch", "final_test_acc", "epochs", "params", "receptive_field",
                  "configuration_id", "monitor")  # fmt: skip


TABLE_IMAGES = 100  # misclassified test images in a per-class view's table, a few per class


class Tracker:
    """A job's W&B run, with every number logged at a step also written as a TensorBoard
    scalar when a `writer` is given (logger.tensorboard=true; logger=tensorboard is that
    without W&B)."""

    def __init__(self, run: Any, writer: SummaryWriter | None = None) -> None:
        self.run, self.writer = run, writer

    @property
    def id(self) -> str:
        return self.run.id

    @property
    def summary(self) -> Any:
        """The run's summary: its final value of each key (`update` it with a dict)."""
        return self.run.summary

    def log(self, data: dict[str, Any], step: int | None = None, **kwargs: Any) -> None:
        if self.writer is not None and step is not None:
            for key, value in data.items():
                if isinstance(value, int | float):
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        self.run.log(data, step=step, **kwargs)

    def add_tags(self, *tags: str) -> None:
        """Tags the run gets while it runs (a search's pruned trial), beside its first ones."""
        self.run.tags = (*self.run.tags, *tags)

    def define_metrics(self, optimized_metric: str) -> None:
        """Epoch metrics are plotted against `epoch`; the summary keeps each score's best value
        (highest accuracy, lowest loss), so a run that stops early still shows it.

        best_<optimized_metric> is the metric the W&B sweep files optimise: it is logged every
        epoch (see RunRecord.end_epoch) and its summary is its latest value, the best epoch's so
        far. (W&B 0.31's define_metric has no `goal`; the sweep file states it.)
        """
        self.run.define_metric("epoch")
        self.run.define_metric("*", step_metric="epoch")
        for name in SCORES:
            self.run.define_metric(name, summary="min" if best_is_lowest(name) else "max")
        self.run.define_metric(f"best_{optimized_metric}", step_metric="epoch", summary="last")

    def log_results(self, results: dict[str, Any], graphs: Path, checkpoint: Path) -> None:
        """The curves as an image, and the checkpoint as the run's own model artifact,
        model-<run id> (aliases best and latest), described by the run's accuracies, epoch,
        parameters, receptive field and configuration id."""
        self.run.log({"graphs": wandb.Image(str(graphs))})
        described = [k for k in results if k in ARTIFACT_FACTS or re.fullmatch(r"best_\w+_acc", k)]
        metadata = {k: results[k] for k in described}
        artifact = wandb.Artifact(f"model-{self.id}", type="model", metadata=metadata)
        artifact.add_file(str(checkpoint))
        self.run.log_artifact(artifact, aliases=["best", "latest"])

    def log_class_view(self, view: ClassView) -> None:
        """Per-class accuracy into the summary, W&B's confusion-matrix panel, and a table of
        misclassified test images with true class, predicted class and confidence; in the
        run's current history row (not committed: no extra step)."""
        names, p = view.classes, view.predictions
        self.summary.update({f"class_acc/{k}": v for k, v in view.accuracy_by_class.items()})
        table = wandb.Table(columns=["image", "true", "predicted", "confidence"])
        for i in view.misclassified(TABLE_IMAGES):
            table.add_data(wandb.Image(view.test_set.images[i]), names[p.targets[i]],
                           names[p.predicted[i]], float(p.confidence[i]))  # fmt: skip
        self.run.log(
            {
                "confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=p.targets.tolist(), preds=p.predicted.tolist(), class_names=list(names)
                ),
                "misclassified": table,
            },
            commit=False,
        )


def log_comparison(rows: list[dict], curves: Path, out: Path, mode: str, project: str) -> None:
    """A comparison of runs (report's table and curves) as one W&B run of job type `report`,
    its files under out/."""
    keep_files_in(out)
    run = wandb.init(project=project, job_type="report", dir=str(out), mode=mode, name=out.name)
    columns = list(rows[0])
    run.log(
        {
            "runs": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows]),
            "curves": wandb.Image(str(curves)),
        }
    )
    run.finish()
