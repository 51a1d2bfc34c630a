"""The report's Search section: a search's study (hparams_search=optuna and the presets built
on it) read back from its storage beside its trials' run folders.

A folder is a search's sweep folder when it holds an Optuna storage: optuna.db, or run folders
whose .hydra/hydra.yaml names an Optuna sweeper with a storage. Finding one reads only those
files; Optuna (the search extra) is imported only to read a study found, so the report of
other runs needs no Optuna. The section holds one line on the study and its best trial, a
picture of the trials' values and of the values they reported after each epoch, a table of the
trials, the parameters' importance, and the epochs the search trained against what its trials
would have trained unpruned. A study that cannot be read is named in one warning line, and
the rest of the report is written all the same.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import OmegaConf

from cifar_exp.track import plots
from cifar_exp.track.record import PRUNED, RESULTS
from hydra_plugins.optuna_pruning_sweeper import REFUSED, TRIAL_ENV

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

log = logging.getLogger("cifar_exp.report")

STUDY_FILE = "optuna.db"  # conf/hparams_search/optuna.yaml's storage, in the sweep folder
INSTALL = "pip install 'cifar-exp[search]'"
# The study's trial states as the report names them, in the order it counts them.
STATES = ("complete", "pruned", REFUSED, "failed", "running")


def cell(text: str) -> str:
    """Text for a markdown table's cell: a `|` in it would end the cell."""
    return text.replace("|", "\\|")


def number(value: float) -> str:
    return f"{value:.4g}"


def params_text(params: dict[str, Any]) -> str:
    """A trial's parameters as the overrides that set them."""
    return " ".join(
        f"`{name}={number(value) if isinstance(value, float) else value}`"
        for name, value in sorted(params.items())
    )


@dataclass(frozen=True)
class TrialJob:
    """A run folder of a search: the study it ran a trial of, and what its results.json says."""

    path: Path
    study_name: str | None
    storage: str  # hydra.sweeper.storage as written, interpolations unresolved
    trial: int | None  # the number the pruning sweeper gave the job; None without a pruner
    overrides: frozenset[str]  # its task overrides: the sampled values among them
    results: dict | None  # None: it stopped before training

    @classmethod
    def read(cls, run_dir: Path) -> TrialJob | None:
        """The run folder's job, or None when no Optuna sweeper with a storage ran it (a grid
        sweep, a single run, an in-memory study) or its .hydra/ files are unreadable."""
        try:
            hydra = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra
            sweeper = OmegaConf.to_container(hydra.sweeper, resolve=False)
            trial = hydra.job.get("env_set", {}).get(TRIAL_ENV)
            task = OmegaConf.to_container(hydra.overrides.task)
            results_file = run_dir / RESULTS
            results = json.loads(results_file.read_text()) if results_file.is_file() else None
        except Exception:  # noqa: BLE001 - a damaged run: load_run names it
            return None
        storage = sweeper.get("storage")
        if "optuna" not in str(sweeper.get("_target_")) or not isinstance(storage, str):
            return None
        return cls(
            run_dir, sweeper.get("study_name"), storage,
            None if trial is None else int(trial), frozenset(task), results,
        )  # fmt: skip

    @property
    def epochs(self) -> int:
        return (self.results or {}).get("epochs", 0)

    @property
    def pruned(self) -> bool:
        return (self.results or {}).get("state") == PRUNED

    @property
    def epochs_unpruned(self) -> int:
        """The epochs it would have trained had no pruner stopped it: a pruned run's planned
        epochs; any other run trained, or stopped, on its own."""
        return (
            (self.results or {}).get("planned_epochs", self.epochs) if self.pruned else self.epochs
        )

    def resolved_storage(self, folder: Path) -> str:
        """The study's storage URL. A SQLite file in `folder` (the sweep folder) named as the
        storage's file is the study's, also when the folder was moved since; else the URL with
        its interpolations resolved against the run's config."""
        if self.storage.startswith("sqlite:"):
            local = folder / self.storage.rsplit("/", 1)[-1]
            if local.is_file():
                return f"sqlite:///{local}"
        hydra = OmegaConf.load(self.path / ".hydra" / "hydra.yaml")
        config = OmegaConf.merge(OmegaConf.load(self.path / ".hydra" / "config.yaml"), hydra)
        return str(OmegaConf.select(config, "hydra.sweeper.storage"))

    def is_trial(self, trial: FrozenTrial) -> bool:
        """Whether this job ran `trial`: the number the sweeper gave it, else (no pruner) the
        trial's sampled values among its overrides."""
        if self.trial is not None:
            return self.trial == trial.number
        return (
            bool(trial.params)
            and {f"{name}={value}" for name, value in trial.params.items()} <= self.overrides
        )


@dataclass(frozen=True)
class SearchFolder:
    """A search's sweep folder: where its study is stored, and its trials' run folders."""

    folder: Path
    storage: str | None  # the study's URL; None: the storage could not be resolved
    study_name: str | None  # None: the storage's only study (or the one named as the folder)
    jobs: tuple[TrialJob, ...]

    @classmethod
    def of(cls, folder: Path) -> SearchFolder | None:
        """The search whose sweep folder `folder` is, or None; reads no study (no Optuna)."""
        jobs = [
            job
            for hydra_dir in sorted(folder.rglob(".hydra"))
            if (job := TrialJob.read(hydra_dir.parent)) is not None
        ]
        if jobs:
            first = jobs[0]
            try:
                storage = first.resolved_storage(folder)
            except Exception:  # noqa: BLE001 - an interpolation that no longer resolves
                storage = None
            jobs = [job for job in jobs if job.study_name == first.study_name]
            return cls(folder, storage, first.study_name, tuple(jobs))
        if (folder / STUDY_FILE).is_file():
            return cls(folder, f"sqlite:///{folder / STUDY_FILE}", None, ())
        return None

    def where(self, start: Path | None = None) -> str:
        """The study's storage for a message: its file (relative to `start` when inside it),
        or its URL less any password."""
        if self.storage is None:
            return f"the storage of the search in {self.folder}"
        if self.storage.startswith("sqlite:///"):
            file = Path(self.storage.removeprefix("sqlite:///"))
            inside = start is not None and file.is_relative_to(start)
            return file.relative_to(start).as_posix() if inside else str(file)
        url = urllib.parse.urlsplit(self.storage)
        return url._replace(netloc=url.netloc.rpartition("@")[2]).geturl()

    def section(self, out: Path, stem: str) -> list[str]:
        """report.md's Search section, its pictures `<stem>_*.png` written into `out` first;
        when the study cannot be read, a line saying why, also logged."""
        lines = ["", "## Search", ""]
        try:
            search = Search.load(self)
        except ImportError as err:  # Optuna, or a database's driver: the search extra
            log.warning("%s: its Search section needs %s: %s", self.folder, err.name, INSTALL)
            return [*lines, f"The search's study is not shown: it needs {err.name} ({INSTALL})."]
        except Exception as err:  # noqa: BLE001 - any damage to the study: name it, go on
            reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            log.warning("%s: the search's study cannot be read (%s)", self.where(), reason)
            return [*lines, f"The study in `{self.where()}` cannot be read ({cell(reason)})."]
        return [*lines, *search.markdown(out, stem)]

    def cost(self) -> str:
        """The epochs the search trained against those its trials would have trained without
        a pruner (a pruned trial to its planned epochs), over the trials with a run folder."""
        jobs = self.jobs
        trained = sum(job.epochs for job in jobs)
        unpruned = sum(job.epochs_unpruned for job in jobs)
        line = (
            f"Epochs trained: {trained} by the {len(jobs)} trial(s) with a run folder; "
            f"{unpruned} unpruned (the pruned trials to their planned epochs)"
        )
        if unpruned == trained:
            return f"{line}: no trial was pruned."
        return (
            f"{line}: pruning saved {unpruned - trained} ({100 * (1 - trained / unpruned):.0f}%)."
        )

    def read_only_storage(self) -> str:
        """The storage URL, a SQLite file opened read-only: a report never writes the study
        (nor creates a file where one is missing)."""
        if self.storage is None:
            raise ValueError("hydra.sweeper.storage does not resolve (an interpolation)")
        if not self.storage.startswith("sqlite:///"):
            return self.storage
        path = urllib.parse.quote(os.path.abspath(self.storage.removeprefix("sqlite:///")))
        return f"sqlite:///file:{path}?mode=ro&uri=true"


@dataclass(frozen=True)
class SearchTrial:
    """One trial of the study, with its run folder's job if the folder holds one."""

    frozen: FrozenTrial
    job: TrialJob | None

    @property
    def number(self) -> int:
        return self.frozen.number

    @property
    def state(self) -> str:
        """complete, pruned, refused, failed, running or waiting."""
        name = self.frozen.state.name
        if name == "PRUNED" and REFUSED in self.frozen.user_attrs:
            return REFUSED
        return {"FAIL": "failed"}.get(name, name.lower())

    @property
    def state_text(self) -> str:
        """The state for the table; a refusal with the first sentence of its reason."""
        if self.state != REFUSED:
            return self.state
        return f"{REFUSED}: {str(self.frozen.user_attrs[REFUSED]).split('. ', 1)[0]}"

    @property
    def stopped_at(self) -> int | None:
        """The last epoch a pruned trial reported: where the pruner stopped it."""
        return self.frozen.last_step if self.state == "pruned" else None

    @property
    def value(self) -> float | None:
        """Its value: a completed trial's, or the last a pruned one reported."""
        if self.frozen.values is not None and len(self.frozen.values) == 1:
            return self.frozen.values[0]
        return None if self.stopped_at is None else self.frozen.intermediate_values[self.stopped_at]

    def row(self) -> str:
        values = self.frozen.values
        value = (
            ", ".join(map(number, values)) if values and len(values) > 1
            else "–" if self.value is None else number(self.value)
        )  # fmt: skip
        cells = [
            str(self.number), cell(self.state_text), value,
            "–" if self.stopped_at is None else str(self.stopped_at),
            "–" if self.job is None else str(self.job.epochs),
            cell(params_text(self.frozen.params)) or "–",
        ]  # fmt: skip
        return f"| {' | '.join(cells)} |"


# Optuna 2.10's default importance evaluator (fANOVA) fails under NumPy 2: its trees read
# scikit-learn's node values as arrays (fixed in later Optuna). Mean decrease in impurity, the
# other evaluator it ships, fits a random forest of scikit-learn too; seeded, a report drawn
# again gives the same numbers. Its picture (plot_param_importances) calls matplotlib.cm's
# get_cmap, gone since matplotlib 3.9: plots.plot_importance draws it.
IMPORTANCE_SEED = 0


@dataclass
class Search:
    """A study read back, with its trials' run folders."""

    place: SearchFolder
    study: optuna.Study
    trials: list[SearchTrial]
    metric: str  # what the trials optimise (results.json's optimized_metric)

    @classmethod
    def load(cls, place: SearchFolder) -> Search:
        """The study in `place`'s storage, read-only. ImportError without Optuna; any error
        of the storage's (a damaged file, another database) as Optuna raises it."""
        import optuna

        storage = optuna.storages.RDBStorage(place.read_only_storage())
        name = place.study_name or cls.only_study(storage, place.folder)
        study = optuna.load_study(study_name=name, storage=storage)
        unmatched = list(place.jobs)
        trials = []
        for frozen in study.get_trials(deepcopy=False):
            job = next((job for job in unmatched if job.is_trial(frozen)), None)
            if job is not None:
                unmatched.remove(job)
            trials.append(SearchTrial(frozen, job))
        metrics = [j.results["optimized_metric"] for j in place.jobs if j.results]
        return cls(place, study, trials, metrics[0] if metrics else "value")

    @staticmethod
    def only_study(storage: optuna.storages.RDBStorage, folder: Path) -> str:
        """The name of the storage's study, found without a trial folder to name it: its only
        one, or the one named as the folder (the presets' sweep folder is the study's name)."""
        names = [s.study_name for s in storage.get_all_study_summaries()]
        if len(names) == 1 or folder.name in names:
            return names[0] if len(names) == 1 else folder.name
        raise ValueError(f"it holds {len(names)} studies ({', '.join(names)}), none named "
                         f"{folder.name!r}: name one in a trial folder")  # fmt: skip

    @property
    def objectives(self) -> int:
        return len(self.study.directions)

    def counts(self) -> dict[str, int]:
        """The trials by state, in STATES' order (and any waiting)."""
        counts = dict.fromkeys(STATES, 0)
        for trial in self.trials:
            counts[trial.state] = counts.get(trial.state, 0) + 1
        return counts

    def summary(self, out: Path) -> str:
        """The line on the study: its name, direction and metric, trials by state, best."""
        directions = ", ".join(d.name.lower() for d in self.study.directions)
        counts = ", ".join(f"{n} {state}" for state, n in self.counts().items())
        line = (
            f"Study `{self.study.study_name}` (`{self.place.where(out)}`), {directions} "
            f"{self.metric}: {len(self.trials)} trials: {counts}."
        )
        complete = [t for t in self.trials if t.state == "complete"]
        if not complete:
            return f"{line} No trial has completed yet."
        if self.objectives > 1:
            front = ", ".join(str(t.number) for t in self.study.best_trials)
            return f"{line} Pareto front: trials {front}."
        best = self.study.best_trial
        return (
            f"{line} Best: trial {best.number}, {self.metric} {number(best.value)}, "
            f"{params_text(best.params)}."
        )

    def table(self) -> list[str]:
        return [
            "| trial | state | value | pruned at epoch | epochs trained | params |",
            "|---:|---|---:|---:|---:|---|",
            *(trial.row() for trial in self.trials),
        ]

    def draw_history(self, path: Path) -> Path:
        curves = {
            t.number: dict(t.frozen.intermediate_values)
            for t in self.trials
            if t.frozen.intermediate_values
        }
        complete = {t.number: t.value for t in self.trials if t.state == "complete"}
        pruned = {t.number for t in self.trials if t.state == "pruned"}
        maximize = self.study.direction.name == "MAXIMIZE"
        return plots.plot_search_history(curves, complete, pruned, maximize, self.metric, path)

    def importance(self, path: Path) -> list[str]:
        """The parameters' importance for the value over the completed trials, as a table and
        a picture at `path`; or the reason it is not shown."""
        complete = [t.frozen for t in self.trials if t.state == "complete"]
        searched = set.intersection(*(set(t.params) for t in complete)) if complete else set()
        reason = (
            f"the study has {self.objectives} objectives" if self.objectives > 1
            else f"{len(complete)} completed trial(s); it needs 2 or more" if len(complete) < 2
            else f"{len(searched)} parameter(s) searched; it needs 2 or more" if len(searched) < 2
            else None
        )  # fmt: skip
        if reason is None:
            try:
                importances = self.importances()
            except ImportError:
                reason = f"it needs scikit-learn ({INSTALL})"
            except (ValueError, RuntimeError) as err:
                reason = str(err)
            else:
                if sum(importances.values()) > 0:
                    return self.importance_lines(importances, len(complete), path)
                reason = "every completed trial has the same value"
        return [f"Parameter importance is not shown: {reason}."]

    def importances(self) -> dict[str, float]:
        import optuna

        evaluator = optuna.importance.MeanDecreaseImpurityImportanceEvaluator(seed=IMPORTANCE_SEED)
        return dict(optuna.importance.get_param_importances(self.study, evaluator=evaluator))

    def importance_lines(self, importances: dict[str, float], trials: int, path: Path) -> list[str]:
        """The importance table, and its picture drawn at `path`."""
        plots.plot_importance(importances, self.metric, path)
        return [
            f"Parameter importance for {self.metric} over the {trials} completed trials "
            "(Optuna's mean decrease in impurity of a random forest; the importances sum to 1):",
            "",
            "| parameter | importance |",
            "|---|---:|",
            *(f"| {cell(name)} | {value:.3f} |" for name, value in importances.items()),
            "",
            f"![parameter importance]({path.name})",
        ]

    def markdown(self, out: Path, stem: str) -> list[str]:
        """The section's lines, its pictures `<stem>_history.png` and `<stem>_importance.png`
        written into `out` first (report.md never links a missing picture)."""
        lines = [self.summary(out), ""]
        if self.objectives == 1:
            history = self.draw_history(out / f"{stem}_history.png")
            lines += [
                f"![the trials' values, and each trial's after every epoch]({history.name})",
                "",
            ]
        return [
            *lines, *self.table(), "", *self.importance(out / f"{stem}_importance.png"), "",
            self.place.cost(),
        ]  # fmt: skip
