"""The report of a search's sweep folder: its Search section, from a real SQLite study whose
trials are added by hand (no training) beside run folders written as a search's jobs write
them."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from conftest import REPO, section_rows
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf, open_dict
from optuna.distributions import (
    CategoricalDistribution,
    LogUniformDistribution,
    UniformDistribution,
)
from optuna.trial import TrialState, create_trial

from cifar_exp.settings import CONF_MODULE
from cifar_exp.tools import report
from cifar_exp.tools.search import Search, SearchFolder

PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "optimizer.lr": LogUniformDistribution(0.005, 0.2),
    "data.batch_size": CategoricalDistribution([64, 128, 256]),
    "model.dropout": UniformDistribution(0.0, 0.2),
}
REASON = (
    "The network is outside its budget: 250,000 parameters, over budget.max_params=200,000. "
    "Change the model, or the limits (budget.max_params=N budget.min_rf=N)."
)


def params(lr: float, batch_size: int, dropout: float) -> dict:
    return {"optimizer.lr": lr, "data.batch_size": batch_size, "model.dropout": dropout}


# Trial number: its state, parameters, the values it reported by epoch, and its run folder's
# state and epochs trained (None: no run folder). Three epochs planned.
TRIALS = {
    0: (TrialState.COMPLETE, params(0.01, 64, 0.1), {1: 0.30, 2: 0.38, 3: 0.42}, ("finished", 3)),
    1: (TrialState.COMPLETE, params(0.05, 128, 0.05), {1: 0.40, 2: 0.50, 3: 0.55}, ("finished", 3)),
    2: (TrialState.PRUNED, params(0.006, 64, 0.15), {1: 0.20}, ("pruned", 1)),
    3: (TrialState.PRUNED, params(0.1, 256, 0.0), {}, None),  # refused: no run folder
    4: (TrialState.FAIL, params(0.19, 256, 0.1), {1: 0.25, 2: 0.30}, ("failed", 2)),
    5: (TrialState.COMPLETE, params(0.02, 256, 0.02), {1: 0.35, 2: 0.44, 3: 0.48}, ("finished", 3)),
}


def add_trials(study: optuna.Study, trials: dict) -> None:
    """The trials as the sweeper tells them: a pruned one with the last value it reported."""
    for state, values, reported, _ in trials.values():
        last = reported[max(reported)] if reported else None
        study.add_trial(
            create_trial(
                state=state, params=values, distributions={k: SPACE[k] for k in values},
                value=last if state in (TrialState.COMPLETE, TrialState.PRUNED) else None,
                intermediate_values=reported,
                user_attrs={} if reported or state != TrialState.PRUNED else {"refused": REASON},
            )
        )  # fmt: skip


def new_study(folder: Path, trials: dict) -> optuna.Study:
    """The study `cifar_exp` in folder/optuna.db, as hparams_search=optuna creates it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # add_trial
        study = optuna.create_study(
            study_name="cifar_exp", storage=f"sqlite:///{folder / 'optuna.db'}",
            direction="maximize",
        )  # fmt: skip
        add_trials(study, trials)
    return study


def write_job(config, sweep: Path, num: int, values: dict, trial: int | None) -> Path:
    """A job's run folder's .hydra/ as Hydra writes it (config.yaml, hydra.yaml and
    overrides.yaml, interpolations kept), from the config composed with the search's command
    and the trial's `values`; the pruning sweeper's trial number in hydra.job.env_set unless
    `trial` is None (a search without a pruner)."""
    run_dir = sweep / f"2026-01-01_00-00-0{num}_{num}"
    config = copy.deepcopy(config)
    overrides = [f"{name}={value}" for name, value in values.items()]
    with open_dict(config):
        for name, value in values.items():
            OmegaConf.update(config, name, value)
        config.hydra.job.num = num
        config.hydra.runtime.output_dir = str(run_dir)
        config.hydra.overrides.task = [*overrides, *config.hydra.overrides.task]
        if trial is not None:
            config.hydra.job.env_set = {"HYDRA_OPTUNA_TRIAL": str(trial)}
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.HYDRA_OPTUNA_TRIAL={trial}")
    hydra = OmegaConf.create({"hydra": config.hydra})
    task = OmegaConf.masked_copy(config, [key for key in config if key != "hydra"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(task, run_dir / ".hydra" / "config.yaml")
    OmegaConf.save(hydra, run_dir / ".hydra" / "hydra.yaml")
    OmegaConf.save(
        OmegaConf.create(list(config.hydra.overrides.task)), run_dir / ".hydra" / "overrides.yaml"
    )
    return run_dir


def write_results(run_dir: Path, state: str, epochs: int, reported: dict[int, float]) -> None:
    """results.json and metrics.jsonl as a run of three planned epochs leaves them."""
    history = [
        {"epoch": e, "train_loss": 2.0, "train_acc": 0.3, "test_loss": 2.0 - v, "test_acc": v,
         "val_loss": 2.0 - v, "val_acc": v, "epoch_seconds": 1.5}
        for e, v in sorted(reported.items())
    ]  # fmt: skip
    best = history[-1]
    results = {
        "state": state, "monitor": "val_acc", "epochs": epochs, "planned_epochs": 3,
        "params": 180_298, "receptive_field": 105, "optimized_metric": "val_acc",
        "best_epoch": best["epoch"], "best_test_acc": best["test_acc"],
        "best_val_acc": best["val_acc"], "final_test_acc": best["test_acc"],
        "stopped_early": False, "mean_epoch_seconds": 1.5,
    }  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in history))


def compose_job(*overrides: str):
    """The training config of a command of three epochs with `overrides`, Hydra's own keys
    included (what a job's .hydra/ files are written from)."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose(
            "train", ["trainer.epochs=3", "logger=none", *overrides], return_hydra_config=True
        )


def write_search(output_root: Path, trials: dict) -> Path:
    """A search's sweep folder (output_root/optuna/cifar_exp): the study, and a run folder
    for each trial that had one. Trial 5's job carries no trial number, as without a pruner."""
    config = compose_job("hparams_search=optuna", f"output_root={output_root}")
    sweep = output_root / "optuna" / "cifar_exp"
    sweep.mkdir(parents=True)
    new_study(sweep, trials)
    jobs = [(n, trial) for n, trial in trials.items() if trial[3] is not None]
    for num, (number, (_, values, reported, (state, epochs))) in enumerate(jobs):
        run_dir = write_job(config, sweep, num, values, None if number == 5 else number)
        write_results(run_dir, state, epochs, reported)
    return sweep


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory) -> Path:
    return write_search(tmp_path_factory.mktemp("search"), TRIALS)


@pytest.fixture(scope="module")
def search_report(search_dir) -> str:
    report.main([str(search_dir), "--images", "0"])
    return (search_dir / "report.md").read_text()


def search_section(report_md: str) -> str:
    return report_md.split("\n## Search\n", 1)[1]


def test_the_search_section_sums_the_study_up(search_report):
    summary = search_section(search_report).strip().splitlines()[0]
    assert summary == (
        "Study `cifar_exp` (`optuna.db`), maximize val_acc: 6 trials: "
        "3 complete, 1 pruned, 1 refused, 1 failed, 0 running. Best: trial 1, val_acc 0.55, "
        "`data.batch_size=128` `model.dropout=0.05` `optimizer.lr=0.05`."
    )


def test_the_search_section_lists_every_trial_with_its_state_and_epochs(search_report):
    rows = section_rows(search_section(search_report), "| trial | state |")
    assert [row[:5] for row in rows] == [
        ["0", "complete", "0.42", "–", "3"],
        ["1", "complete", "0.55", "–", "3"],
        ["2", "pruned", "0.2", "1", "1"],  # at the value it last reported, after epoch 1
        ["3", "refused: The network is outside its budget: 250,000 parameters, over "
              "budget.max_params=200,000", "–", "–", "–"],
        ["4", "failed", "–", "–", "2"],
        ["5", "complete", "0.48", "–", "3"],  # its run folder found by its values
    ]  # fmt: skip
    assert rows[0][5] == "`data.batch_size=64` `model.dropout=0.1` `optimizer.lr=0.01`"


def test_the_search_section_weighs_the_parameters_over_the_completed_trials(search_report):
    section = search_section(search_report)
    assert "Parameter importance for val_acc over the 3 completed trials" in section
    rows = section_rows(section, "| parameter | importance |")
    assert sorted(name for name, _ in rows) == ["data.batch_size", "model.dropout", "optimizer.lr"]
    assert sum(float(value) for _, value in rows) == pytest.approx(1, abs=0.002)


def test_the_search_section_counts_the_epochs_pruning_saved(search_report):
    assert search_section(search_report).strip().splitlines()[-1] == (
        "Epochs trained: 12 by the 5 trial(s) with a run folder; 14 unpruned (the pruned trials "
        "to their planned epochs): pruning saved 2 (14%)."
    )


def test_the_search_pictures_are_written_and_linked(search_report, search_dir):
    for name in ("search_history.png", "search_importance.png"):
        assert (search_dir / name).read_bytes()[:8] == PNG
        assert f"]({name})" in search_section(search_report)
    assert (search_dir / "report.png").read_bytes()[:8] == PNG  # the runs' report as before
    assert "| [0](" in search_report.split("## Search")[0]


def test_a_damaged_study_is_named_once_and_the_rest_is_reported(search_dir, tmp_path, caplog):
    copy = tmp_path / "copy"
    shutil.copytree(search_dir, copy)
    (copy / "optuna.db").write_bytes(b"not a database" * 100)
    with caplog.at_level(logging.WARNING, logger="cifar_exp.report"):
        report.main([str(copy), "--images", "0"])
    warned = [r.getMessage() for r in caplog.records if "optuna.db" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith(f"{copy / 'optuna.db'}: the search's study")
    text = (copy / "report.md").read_text()
    assert f"The study in `{copy / 'optuna.db'}` cannot be read (DatabaseError" in text
    assert "## By configuration" in text and "search_history.png" not in text


def test_a_moved_trial_folder_finds_its_study_where_its_config_says(search_dir, tmp_path):
    """The run folders without the study: hydra.sweeper.storage resolved against each run's
    config (sqlite:///${hydra.sweep.dir}/optuna.db, the sweep folder under output_root)."""
    copy = tmp_path / "copy"
    shutil.copytree(search_dir, copy, ignore=shutil.ignore_patterns("optuna.db"))
    place = SearchFolder.of(copy)
    assert place.storage == f"sqlite:///{search_dir / 'optuna.db'}"
    assert [trial.job is not None for trial in Search.load(place).trials] == [
        True, True, True, False, True, True,
    ]  # fmt: skip


def reasons(folder: Path, trials: dict) -> list[str]:
    """What the Search section says of importance for a study of `trials` in `folder`."""
    folder.mkdir()
    new_study(folder, trials)
    search = Search.load(SearchFolder.of(folder))
    return search.importance(folder / "importance.png")


def test_importance_is_not_shown_for_fewer_than_two_completed_trials_or_one_parameter(tmp_path):
    one_trial = {n: TRIALS[n] for n in (0, 2)}
    assert reasons(tmp_path / "one", one_trial) == [
        "Parameter importance is not shown: 1 completed trial(s); it needs 2 or more."
    ]
    lr_only = {
        n: (state, {"optimizer.lr": values["optimizer.lr"]}, reported, run)
        for n, (state, values, reported, run) in TRIALS.items()
    }
    assert reasons(tmp_path / "lr", lr_only) == [
        "Parameter importance is not shown: 1 parameter(s) searched; it needs 2 or more."
    ]
    assert not list(tmp_path.rglob("importance.png"))


def report_in_a_process(folder: Path, before: str = "") -> subprocess.CompletedProcess:
    """The report of `folder` in a fresh process (`before` run first), printing the Optuna
    modules it imported."""
    code = (
        f"import sys; {before}\nfrom cifar_exp.tools import report\n"
        f"report.main([{str(folder)!r}, '--images', '0'])\n"
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'optuna'))"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=True,
    )  # fmt: skip


@pytest.mark.slow  # a report in its own process
def test_the_report_of_other_runs_imports_no_optuna(tmp_path):
    """A grid sweep's run: no Optuna sweeper, no study, no Search section."""
    run_dir = write_job(compose_job(), tmp_path, 0, {"seed": 1}, trial=None)
    write_results(run_dir, "finished", 3, TRIALS[0][2])
    proc = report_in_a_process(tmp_path)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
    assert "## Search" not in (tmp_path / "report.md").read_text()


@pytest.mark.slow  # a report in its own process
def test_without_optuna_the_search_section_says_what_to_install(search_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(search_dir, copy)
    proc = report_in_a_process(copy, before="sys.modules['optuna'] = None")
    assert f"{copy}: its Search section needs optuna: pip install" in proc.stderr
    text = (copy / "report.md").read_text()
    assert "not shown: it needs optuna (pip install 'cifar-exp[search]')" in text
    assert "## By configuration" in text
