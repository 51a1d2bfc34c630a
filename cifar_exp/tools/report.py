"""`python -m cifar_exp.report <sweep or run folders...>`: compare finished runs at a glance.

Reads every run's results.json, metrics.jsonl and .hydra/ config (a run folder is one holding
.hydra/; a sweep folder holds run folders) and writes, into the output folder:
  report.md   one row per run: the overrides that define it, parameters, receptive field,
              best and final test accuracy, epochs, mean epoch time; then one row per
              configuration id (runs differing only in seed pooled: n, mean ± std, range,
              95% CI) and Welch's t-test for each pair of configurations; then the figures;
              and for a folder that is a search's (hparams_search=optuna), a Search section
              on its study (tools.search), with its pictures search_*.png;
  report.png  test accuracy and test loss per epoch, the mean of each configuration's runs
              with a ±1 std band, on shared axes;
and into each run folder misclassified.png, test images its best checkpoint gets wrong.
The output folder is the one folder given, the common parent of several, or --out.

Only finished runs are compared and pooled. The others are listed with their state (stopped,
failed, killed, running, damaged), and so are a sweep's jobs that never started (from its
multirun.yaml); a damaged run is named and the others are reported all the same.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from cifar_exp import files
from cifar_exp.engine import checkpoint, run_folders
from cifar_exp.engine.compute import device_problem
from cifar_exp.errors import UserError, exit_on_user_error
from cifar_exp.settings import DataSettings, checked
from cifar_exp.tools import aggregate
from cifar_exp.tools.search import SearchFolder
from cifar_exp.track import plots
from cifar_exp.track.per_class import ClassView
from cifar_exp.track.record import (
    FAILED,
    FINISHED,
    METRICS,
    RESULTS,
    RUNNING,
    configuration_id,
    read_metrics,
)
from cifar_exp.track.tracker import log_comparison

log = logging.getLogger("cifar_exp.report")


@dataclass
class Run:
    path: Path
    config: DictConfig
    overrides: list[str]  # the command-line and sweep overrides that define the run
    metrics: list[dict]
    results: dict  # its results.json
    label: str = ""  # the overrides that tell it apart from the other runs
    grid: Path | None = None  # its misclassified.png, once drawn

    @functools.cached_property
    def configuration(self) -> str:
        """Its configuration id (shared with the runs that differ only in seed or runtime
        keys), from its config: so runs of earlier versions, whose results.json kept an id
        of their own targets' names, or none, pool with today's."""
        return configuration_id(OmegaConf.to_container(self.config, resolve=True))


@dataclass
class Comparison:
    runs: list[Run]  # the finished runs
    common: list[str] = field(default_factory=list)  # overrides every run shares
    left_out: list[LeftOut] = field(default_factory=list)  # and why

    @property
    def configurations(self) -> dict[str, list[Run]]:
        """The runs by configuration id, in the order of their first run."""
        groups: dict[str, list[Run]] = {}
        for run in self.runs:
            groups.setdefault(run.configuration, []).append(run)
        return groups

    def configuration_label(self, runs: list[Run]) -> str:
        """The overrides all of a configuration's runs share, less the common ones and seed."""
        shared = set.intersection(*(set(r.overrides) for r in runs)) - set(self.common)
        own = sorted(o for o in shared if o.split("=", 1)[0].lstrip("+~") != "seed")
        return " ".join(own) or "(no overrides)"


def defining_overrides(run_dir: Path, config: DictConfig) -> list[str]:
    """The run's overrides, less those that only say where and how it runs (its
    `runtime_keys`, which train.yaml also leaves out of run names)."""
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    excluded = set(config.runtime_keys)
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in excluded)


@dataclass(frozen=True)
class LeftOut:
    """A run, or a sweep's planned job, that is not in the comparison, and why."""

    where: str  # the run folder, or the sweep job
    state: str  # stopped, failed, killed, running, damaged, never started, unfinished
    detail: str = ""

    @property
    def line(self) -> str:
        return f"{self.where} ({', '.join(filter(None, [self.state, self.detail]))})"


def last_error(run_dir: Path) -> str:
    """The last error the run logged (train.log), or why there is nothing to say."""
    log_file = run_dir / "train.log"
    lines = log_file.read_text(errors="replace").splitlines() if log_file.is_file() else []
    errors = [line.split("] - ", 1)[-1] for line in lines if "[ERROR]" in line]
    return errors[-1] if errors else f"no {RESULTS}: it stopped before training began"


def run_state(run_dir: Path, results: dict | None, config: DictConfig) -> tuple[str, str]:
    """The run's state and a line about it. A run that says it is running but whose folder no
    process holds was killed. Results of versions that kept no state are finished when they
    reached their last epoch (or stopped early)."""
    if results is None:
        return FAILED, last_error(run_dir)
    planned = results.get("planned_epochs", config.trainer.epochs)
    done = f"{results.get('epochs', 0)} of {planned} epochs"
    state = results.get("state")
    if state is None:
        finished = results.get("epochs", 0) >= planned or results.get("stopped_early")
        state = FINISHED if finished else "unfinished"
    if state == RUNNING and not run_folders.in_use(run_dir):
        state = "killed"
    return state, ", ".join(filter(None, [done, results.get("error", "")]))


def load_run(run_dir: Path) -> Run | LeftOut:
    """The finished run in `run_dir`, or why it is left out."""
    try:
        results = (
            json.loads((run_dir / RESULTS).read_text()) if (run_dir / RESULTS).is_file() else None
        )
        config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
        overrides = defining_overrides(run_dir, config)
        state, detail = run_state(run_dir, results, config)
    except Exception as err:  # noqa: BLE001 - any damage to any file: name the run, go on
        reason = (str(err).strip().splitlines() or [""])[0]
        return LeftOut(str(run_dir), "damaged", f"{type(err).__name__}: {reason}")
    if state != FINISHED:
        return LeftOut(str(run_dir), state, detail)
    metrics, damaged = read_metrics(run_dir / METRICS)
    if damaged:
        log.warning(
            "%s: %d damaged line(s) of %s left out of its curves", run_dir, len(damaged), METRICS
        )
    return Run(run_dir, config, overrides, metrics, results)


def evaluation(folder: Path) -> bool:
    """Whether the folder is an evaluation's (cifar_exp.evaluate), not a training run's."""
    try:
        return OmegaConf.load(folder / ".hydra" / "hydra.yaml").hydra.job.name == "evaluate"
    except Exception:  # noqa: BLE001 - unreadable: a run's, damaged, named by load_run
        return False


def job_number(run_dir: Path) -> int:
    """The run's number in its sweep (hydra.job.num; 0 for a single run): its launch order;
    from the folder's name (<num>_<overrides>) if its .hydra/hydra.yaml is unreadable."""
    try:
        return int(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.get("num") or 0)
    except Exception:  # noqa: BLE001 - a damaged run is still placed, and named by load_run
        prefix = run_dir.name.split("_", 1)[0]
        return int(prefix) if prefix.isdigit() else 0


def planned_jobs(sweep_dir: Path) -> list[str]:
    """The jobs the sweep in `sweep_dir` was to run, by number: the overrides that tell each
    apart from the others (a grid sweep), or `trial <n>` (a search); none when the folder is
    not a sweep's."""
    if not (sweep_dir / "multirun.yaml").is_file():
        return []
    config = OmegaConf.load(sweep_dir / "multirun.yaml")
    sweeper = config.hydra.sweeper
    if "n_trials" in sweeper:
        return [f"trial {n}" for n in range(sweeper.n_trials)]
    params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
    parsed = OverridesParser.create().parse_overrides([*params, *config.hydra.overrides.task])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    shared = set.intersection(*map(set, jobs)) if len(jobs) > 1 else set()
    return [" ".join(o for o in job if o not in shared) for job in jobs]


def never_started(sweep_dir: Path, run_dirs: list[Path]) -> list[LeftOut]:
    """The sweep's planned jobs with no run folder."""
    started = {job_number(d) for d in run_dirs if d.parent == sweep_dir}
    return [
        LeftOut(f"{sweep_dir} job {n} ({overrides or 'no overrides'})", "never started")
        for n, overrides in enumerate(planned_jobs(sweep_dir))
        if n not in started
    ]


def find_runs(folders: Sequence[Path]) -> Comparison:
    """Every finished run in the folders, sweep jobs in launch order, with overrides split
    into shared ones and each run's own; and what is left out."""
    runs: list[Run] = []
    left_out: list[LeftOut] = []
    for folder in folders:
        run_dirs = sorted(
            {p.parent for p in folder.rglob(".hydra") if p.is_dir() and not evaluation(p.parent)},
            key=lambda p: (p.parent, job_number(p), p.name),
        )
        if not run_dirs:
            left_out.append(LeftOut(str(folder), "no runs", "no training run folder in it"))
        for loaded in map(load_run, run_dirs):
            (runs if isinstance(loaded, Run) else left_out).append(loaded)
        left_out += never_started(folder, run_dirs)
    if left_out:
        log.warning(
            "Left out of the comparison (not finished): %s",
            "; ".join(o.line for o in left_out),
        )  # fmt: skip
    if not runs:
        raise UserError(
            f"No finished run in {', '.join(map(str, folders))}: a run folder holds "
            f"{RESULTS} with the state finished (python -m cifar_exp.train writes it)"
        )

    shared = set.intersection(*(set(r.overrides) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        own = [o for o in run.overrides if o not in shared]
        run.label = " ".join(own) or run.path.name
    return Comparison(runs, sorted(shared), left_out)


def summarize(run: Run) -> dict[str, Any]:
    """The table row of a run, from its results.json."""
    keys = ("best_test_acc", "best_epoch", "final_test_acc", "epochs", "params",
            "receptive_field", "mean_epoch_seconds", "monitor")  # fmt: skip
    return {"run": run.label, **{key: run.results[key] for key in keys},
            "configuration_id": run.configuration}  # fmt: skip


def draw_misclassified(run: Run, images: int, eval_images: int, device: str) -> Path | None:
    """Score `eval_images` test images (a fixed, class-balanced subset of the run's test set)
    with the run's best checkpoint and draw `images` of those it gets wrong, a few per class."""
    ckpt = run.path / "checkpoints" / "best.pt"
    if not ckpt.is_file():
        log.warning("No misclassified images for %s: %s is missing", run.path, ckpt)
        return None
    state = checkpoint.load(ckpt, option="checkpoint")
    data_settings = checked(DataSettings, run.config.data, key="data")
    limit = data_settings.limit_test
    data_settings.limit_test = eval_images if limit is None else min(limit, eval_images)
    view = ClassView.of_checkpoint(state, data_settings, device)
    wrong = view.misclassified(images)  # balanced over the true classes
    summary, (_, predicted, targets, _), names = view.summary(), view.predictions, view.classes
    captions = [f"true: {names[targets[i]]}\npred: {names[predicted[i]]}" for i in wrong]
    title = (
        f"{run.label}: {len(wrong)} of the {int((predicted != targets).sum())} misclassified among "
        f"{summary['images']} test images (accuracy {100 * summary['accuracy']:.1f}%, "
        f"epoch {view.epoch})"
    )
    return plots.plot_image_grid(
        view.test_set.images[wrong], captions, title, run.path / "misclassified.png"
    )


def markdown(comparison: Comparison, rows: list[dict], out: Path, searches: list[str]) -> str:
    def link(path: Path) -> str:
        return Path(os.path.relpath(path, out)).as_posix()

    lines = [
        "# Run comparison",
        "",
        f"{len(rows)} runs. Overrides common to all: "
        + (" ".join(f"`{o}`" for o in comparison.common) or "none"),
        "",
        "| run | overrides | params | RF | best test acc | final test acc | epochs "
        "| mean epoch (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (run, row) in enumerate(zip(comparison.runs, rows, strict=True)):
        lines.append(
            f"| [{i}]({link(run.path)}) | {row['run']} | {row['params']:,} "
            f"| {row['receptive_field']} "
            f"| {100 * row['best_test_acc']:.2f}% (epoch {row['best_epoch']}, by {row['monitor']}) "
            f"| {100 * row['final_test_acc']:.2f}% | {row['epochs']} "
            f"| {row['mean_epoch_seconds']:.1f} |"
        )
    lines += ["", *by_configuration(comparison), *left_out_section(comparison.left_out)]
    lines += ["", "![test accuracy and loss per epoch](report.png)", *searches, ""]
    for i, run in enumerate(comparison.runs):
        if run.grid:
            lines += [f"## {i}: {run.label}", "", f"![misclassified]({link(run.grid)})", ""]
    return "\n".join(lines)


def left_out_section(left_out: list[LeftOut]) -> list[str]:
    """report.md's list of the runs and jobs not compared, with their state."""
    if not left_out:
        return []
    return [
        "",
        "## Not compared",
        "",
        f"{len(left_out)} run(s) or sweep job(s) did not finish and are in no table or figure "
        "above.",
        "",
        "| run | state | details |",
        "|---|---|---|",
        *(f"| {o.where} | {o.state} | {o.detail} |" for o in left_out),
    ]


AGGREGATED = ("best_test_acc", "final_test_acc")


def percent(value: float) -> str:
    return "–" if value != value else f"{100 * value:.2f}"  # NaN: undefined for one run


def spread_cells(spread: aggregate.Spread) -> str:
    return (
        f"{percent(spread.mean)} ± {percent(spread.std)} | {percent(spread.low)}–"
        f"{percent(spread.high)} | {percent(spread.ci[0])}–{percent(spread.ci[1])}"
    )


def by_configuration(comparison: Comparison) -> list[str]:
    """report.md's section on the runs grouped by configuration id: n, mean ± std, range and
    95% confidence interval of best and final test accuracy (%), then every pair of
    configurations with its difference and Welch's t-test."""
    groups = comparison.configurations
    spreads = {
        metric: {
            config: aggregate.Spread.of([r.results[metric] for r in runs])
            for config, runs in groups.items()
        }
        for metric in AGGREGATED
    }
    ci = f"{100 * aggregate.CONFIDENCE:.0f}% CI"
    lines = [
        "## By configuration",
        "",
        "Runs that differ only in seed (or where and how they ran) share a configuration id. "
        "Accuracies in %: mean ± sample std, min–max, and the "
        f"{ci} of the mean (Student's t).",
        "",
        "| configuration | overrides | n | best test acc | min–max | " + ci
        + " | final test acc | min–max | " + ci + " |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for config, runs in groups.items():
        cells = " | ".join(spread_cells(spreads[m][config]) for m in AGGREGATED)
        label = comparison.configuration_label(runs)
        lines.append(f"| `{config}` | {label} | {len(runs)} | {cells} |")
    if len(groups) < 2:
        return lines
    lines += [
        "",
        f"Differences ({aggregate.TEST}; larger than the noise: p < {aggregate.SIGNIFICANCE}; "
        "–: fewer than two runs on a side):",
        "",
        "| metric | configuration a | configuration b | a − b (points) | p | larger than noise |",
        "|---|---|---|---:|---:|---|",
    ]
    verdict = {True: "yes", False: "no", None: "–"}
    for metric in AGGREGATED:
        for diff in aggregate.differences(spreads[metric]):
            p = "–" if diff.p_value != diff.p_value else f"{diff.p_value:.3g}"
            lines.append(
                f"| {metric} | `{diff.a}` | `{diff.b}` | {100 * diff.delta:+.2f} | {p} "
                f"| {verdict[diff.significant]} |"
            )
    return lines


def report(args: argparse.Namespace) -> Path:
    folders = [Path(f).expanduser().resolve() for f in args.folders]
    if missing := [f for f in folders if not f.is_dir()]:
        raise UserError(f"{missing[0]} is not a folder; give run folders or sweep folders")
    if problem := device_problem("--device", args.device):
        raise UserError(problem)
    out = (
        Path(args.out).resolve()
        if args.out
        else Path(os.path.commonpath(folders))
        if len(folders) > 1
        else folders[0]
    )
    run_folders.check_writable(out, "--out <folder>")
    comparison = find_runs(folders)
    rows = [summarize(run) for run in comparison.runs]
    # The grids may fail (data gone); draw them before report.md, so it never links a missing one.
    if args.images > 0:
        for run in comparison.runs:
            run.grid = draw_misclassified(run, args.images, args.eval_images, args.device)
    curves = plots.plot_comparison(
        {
            comparison.configuration_label(runs) if len(runs) > 1 else runs[0].label: [
                run.metrics for run in runs
            ]
            for runs in comparison.configurations.values()
        },
        out / "report.png",
    )
    searches = [place for folder in folders if (place := SearchFolder.of(folder)) is not None]
    search_lines = [
        line
        for i, place in enumerate(searches)
        for line in place.section(out, "search" if len(searches) == 1 else f"search{i + 1}")
    ]
    files.write_atomically(out / "report.md", markdown(comparison, rows, out, search_lines) + "\n")
    if args.wandb != "off":
        log_comparison(rows, curves, out, args.wandb, args.project)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cifar_exp.report",
        description="Compare training runs: a table (report.md), test curves (report.png) and "
        "misclassified test images per run (misclassified.png in each run folder).",
    )
    parser.add_argument("folders", nargs="+", help="run folders, or sweep folders holding runs")
    parser.add_argument(
        "--out", help="where report.md and report.png go (default: the folder given, or the "
        "common parent of several)"
    )  # fmt: skip
    parser.add_argument(
        "--images", type=int, default=20, help="misclassified images per run (0: no grids)"
    )
    parser.add_argument(
        "--eval-images", type=int, default=500,
        help="test images re-scored per run to find them (a fixed subset of the run's test set)",
    )  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto | cuda | mps | cpu")
    parser.add_argument(
        "--wandb", choices=("off", "offline", "online"), default="off",
        help="also log the table and curves to a W&B run",
    )  # fmt: skip
    parser.add_argument("--project", default="cifar-exp", help="the W&B project")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    with exit_on_user_error():
        out = report(args)
    log.info("Report: %s", out / "report.md")


if __name__ == "__main__":
    main()
