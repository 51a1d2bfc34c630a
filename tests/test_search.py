"""hparams_search=optuna: a search on the validation split, kept in an SQLite study that a
second session continues; its pruner stops the trials that are behind."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import (
    CONF_MODULE,
    REPO,
    compose_train,
    data_overrides,
    hide_module,
    read_metrics,
    run_cli,
    section_rows,
    wandb_records,
)
from hydra import compose, initialize_config_module
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.trial import TrialState

from cifar_exp.engine import preflight
from cifar_exp.model.budget import count_parameters
from hydra_plugins.optuna_pruning_sweeper import config_error
from hydra_plugins.optuna_pruning_sweeper._impl import (
    MAX_REFUSALS_IN_A_ROW,
    PruningSweeperImpl,
    fail_stale_trials,
    shown_storage,
)


@pytest.fixture(scope="module")
def study_dir(cifar_root, cache_dir, tmp_path_factory):
    """Two sessions of the same search, two trials each, on 200 real images for one epoch."""
    out = tmp_path_factory.mktemp("search")
    command = [
        "hparams_search=optuna",
        *data_overrides(cifar_root, cache_dir, train=200, test=100),
        "data.val_size=50", "trainer.epochs=1", "logger=none", "hydra.sweeper.n_trials=2",
        f"output_root={out}",
    ]  # fmt: skip
    logs = [run_cli("train", *command) for _ in range(2)]
    return out / "optuna" / "cifar_exp", logs


@pytest.mark.slow
def test_second_session_continues_the_study(study_dir):
    folder, logs = study_dir
    study = optuna.load_study(study_name="cifar_exp", storage=f"sqlite:///{folder}/optuna.db")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert "Using an existing study" in logs[1].stderr + logs[1].stdout
    trial_folders = sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").is_file())
    assert len(trial_folders) == 4  # the sessions' job 0 and 1 did not share folders


def test_trials_score_the_validation_split_not_the_test_set(study_dir):
    folder, _ = study_dir
    study = optuna.load_study(study_name="cifar_exp", storage=f"sqlite:///{folder}/optuna.db")
    by_lr = {t.params["optimizer.lr"]: t.value for t in study.trials}
    for run in (p for p in folder.iterdir() if (p / "metrics.jsonl").is_file()):
        given = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        overrides = dict(o.split("=", 1) for o in given)
        (metrics,) = read_metrics(run)
        assert by_lr[float(overrides["optimizer.lr"])] == pytest.approx(metrics["val_acc"])
        assert 0.005 <= float(overrides["optimizer.lr"]) <= 0.2
        assert overrides["scheduler"] in ("step", "cosine")


def test_best_trial_is_printed_and_written_to_the_sweep_folder(study_dir):
    folder, logs = study_dir
    study = optuna.load_study(study_name="cifar_exp", storage=f"sqlite:///{folder}/optuna.db")
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(max(t.value for t in study.trials))
    assert results["best_params"] == study.best_trial.params
    assert set(results["best_params"]) == {
        "optimizer.lr", "optimizer.weight_decay", "model.dropout", "data.batch_size", "scheduler"
    }  # fmt: skip
    assert f"Best value: {study.best_value}" in logs[1].stderr + logs[1].stdout
    assert not math.isnan(study.best_value)


def test_the_report_of_the_search_folder_shows_its_study(study_dir):
    """cifar-report on the sweep folder of the two sessions: the Search section reads the
    study (4 trials of one epoch, none pruned) beside the runs' comparison."""
    folder, _ = study_dir
    run_cli("report", str(folder), "--images", "0")
    text = (folder / "report.md").read_text()
    study = optuna.load_study(study_name="cifar_exp", storage=f"sqlite:///{folder}/optuna.db")
    best = study.best_trial
    assert (
        "Study `cifar_exp` (`optuna.db`), maximize val_acc: 4 trials: 4 complete, 0 pruned, "
        f"0 refused, 0 failed, 0 running. Best: trial {best.number}, val_acc {best.value:.4g}, "
    ) in text
    rows = section_rows(text, "| trial | state |")
    assert [row[:5] for row in rows] == [
        [str(t.number), "complete", f"{t.value:.4g}", "–", "1"] for t in study.trials
    ]
    assert "Epochs trained: 4 by the 4 trial(s) with a run folder; 4 unpruned" in text
    assert (folder / "search_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if len({t.value for t in study.trials}) == 1:  # one epoch on 200 images: often all at chance
        assert (
            "Parameter importance is not shown: every completed trial has the same value." in text
        )
        return
    importance = section_rows(text, "| parameter | importance |")
    assert {name for name, _ in importance} == set(best.params)
    assert sum(float(value) for _, value in importance) == pytest.approx(1, abs=0.003)
    assert (folder / "search_importance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_search_optimises_the_validation_accuracy():
    search = preflight.check(compose_train("hparams_search=optuna"))
    assert search.data.val_size == 5000 and search.optimized_metric == "val_acc"
    assert preflight.check(compose_train()).optimized_metric == "test_acc"
    held_out = preflight.check(compose_train("data.val_size=10"))
    assert held_out.optimized_metric == held_out.trainer.monitor == "val_acc"
    chosen = preflight.check(compose_train("data.val_size=10", "trainer.monitor=val_loss"))
    assert chosen.optimized_metric == "val_loss"


@pytest.mark.slow
def test_a_diverging_trial_is_recorded_failed_and_the_search_goes_on(
    cifar_root, cache_dir, tmp_path
):
    """A search space whose second trial (TPE's random start, seed 0) diverges in epoch 2
    (the learning rate times 1e30 after epoch 1): it is marked failed, the third trial runs,
    and the best trial is written as usual."""
    preset = search_preset(
        tmp_path,
        "diverging",
        "# @package _global_\n"
        "defaults:\n  - optuna\n"
        "hydra:\n  sweeper:\n    sampler:\n      seed: 0\n    params:\n"
        "      optimizer.lr: 0.05\n      optimizer.weight_decay: 0.0005\n"
        "      model.dropout: 0.0\n      data.batch_size: 25\n      scheduler: step\n"
        "      scheduler.lr_scheduler.gamma: choice(1e30, 0.5)\n",
    )
    out = tmp_path / "out"
    proc = run_cli(
        "train", *preset,
        *data_overrides(cifar_root, cache_dir, train=200, test=100), "data.val_size=50",
        "trainer.epochs=2", "scheduler.lr_scheduler.step_size=1", "logger=none",
        "hydra.sweeper.n_trials=3", f"output_root={out}", check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    folder = out / "optuna" / "cifar_exp"
    study = optuna.load_study(study_name="cifar_exp", storage=f"sqlite:///{folder}/optuna.db")
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE], output
    assert study.trials[1].params == {"scheduler.lr_scheduler.gamma": 1e30}
    assert "training diverged" in output  # the job's own line; not the sweeper's wrapper:
    assert "Failed experiment" not in output and "float-castable" not in output
    # Under max_failure_rate (0.0 by default) the sweeper would log the failure as too many.
    assert "with max_failure_rate" not in output
    assert "1 job(s) of the sweep failed:\njob 1 (" in output and proc.returncode == 1
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert results["best_params"] == {"scheduler.lr_scheduler.gamma": 0.5}
    assert results["best_value"] == study.best_value


@pytest.mark.slow
def test_a_validation_split_larger_than_the_data_stops_the_search_before_its_first_trial(
    tmp_path,
):
    proc = run_cli(
        "train", "hparams_search=optuna", "data.limit_train=1000", f"output_root={tmp_path}",
        check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "data.val_size" in line]
    assert line.endswith(
        "invalid config value: data.val_size=5000 leaves no training images of "
        "data.limit_train=1000; hold out fewer, e.g. data.val_size=100"
    )
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("train.log"))


def search_preset(tmp_path: Path, name: str, text: str) -> list[str]:
    """The overrides that choose hparams_search=<name>, a preset written with this YAML."""
    group = tmp_path / "conf" / "hparams_search"
    group.mkdir(parents=True)
    (group / f"{name}.yaml").write_text(text)
    return [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", f"hparams_search={name}"]


def trials_of(folder):
    """The study of a search folder, and its trial folders by trial number (the number the
    sweeper gave the job, else the job's place in the session)."""
    study = optuna.load_study(study_name=folder.name, storage=f"sqlite:///{folder}/optuna.db")
    runs = sorted(p for p in folder.iterdir() if (p / "results.json").is_file())
    return study, runs


def prunable_search(tmp_path, cifar_root, cache_dir, *overrides):
    """A search of 3 trials of 3 epochs on 300 images (100 held out, batches of 16) over
    optimizer.lr alone, where TPE's random start (seed 0) draws 1e-6, 0.05, 1e-6: the tiny
    rate stays at chance (val_acc 0.10 every epoch), 0.05 is past it after epoch 1 (0.16)."""
    preset = search_preset(
        tmp_path,
        "prunable",
        "# @package _global_\n"
        "defaults:\n  - optuna\n"
        "hydra:\n  sweeper:\n    sampler:\n      seed: 0\n    params:\n"
        "      optimizer.lr: choice(0.05, 1e-6)\n      optimizer.weight_decay: 0.0005\n"
        "      model.dropout: 0.0\n      data.batch_size: 16\n      scheduler: step\n",
    )
    out = tmp_path / "out"
    proc = run_cli(
        "train", *preset,
        *data_overrides(cifar_root, cache_dir, train=300, test=100), "data.val_size=100",
        "trainer.epochs=3", "hydra.sweeper.n_trials=3", f"output_root={out}", *overrides,
    )  # fmt: skip
    return proc, out / "optuna" / "cifar_exp"


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher",
    [(), ("hydra/launcher=joblib", "hydra.sweeper.n_jobs=2")],
    ids=["one_at_a_time", "joblib_in_parallel"],
)
def test_a_trial_that_is_behind_is_pruned_after_its_first_epoch(
    cifar_root, cache_dir, tmp_path, launcher
):
    """The median pruner, after one finished trial: trial 1 (0.05) is ahead of trial 0 and
    goes on; trial 2 (1e-6) is below the median of trials 0 and 1 at epoch 1 and stops. With
    joblib, trials 0 and 1 train at once in two processes, then trial 2."""
    proc, folder = prunable_search(
        tmp_path, cifar_root, cache_dir, "hydra.sweeper.pruner.n_startup_trials=1",
        "logger=wandb", *launcher,  # offline: the pruned run's tag
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    study, runs = trials_of(folder)
    assert [t.params["optimizer.lr"] for t in study.trials] == [1e-6, 0.05, 1e-6]
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.PRUNED], output
    assert [sorted(t.intermediate_values) for t in study.trials] == [[1, 2, 3], [1, 2, 3], [1]]
    assert study.trials[2].intermediate_values[1] == pytest.approx(0.1)
    assert study.trials[1].intermediate_values[1] > 0.1  # the median it fell below
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert [(r["state"], r["epochs"]) for r in results] == [
        ("finished", 3), ("finished", 3), ("pruned", 1),
    ]  # fmt: skip
    assert len(read_metrics(runs[2])) == 1 and not (runs[2] / "per_class.json").exists()
    assert "Pruned by the search after epoch 1/3 (trial 2)" in output
    assert "Trial 2 pruned after step 1" in output and proc.returncode == 0
    for i, tagged in ((1, False), (2, True)):  # the run's own tags, and `pruned` if it was
        tags = [r["run"]["tags"] for r in wandb_records(runs[i]) if r["type"] == "run"]
        assert f"config:{results[i]['configuration_id']}" in tags[-1]
        assert ("pruned" in tags[-1]) is tagged
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert best["best_params"]["optimizer.lr"] == 0.05


@pytest.mark.slow
def test_without_a_pruner_every_trial_trains_to_its_end(cifar_root, cache_dir, tmp_path):
    """hydra/sweeper/pruner=none: the jobs get no trial and report nothing, as with
    hydra-optuna-sweeper; the trial that the median pruner stops above runs its 3 epochs."""
    proc, folder = prunable_search(
        tmp_path, cifar_root, cache_dir, "hydra/sweeper/pruner=none", "logger=none"
    )
    study, runs = trials_of(folder)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert all(t.intermediate_values == {} for t in study.trials)
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    assert [(r["state"], r["epochs"]) for r in results] == [("finished", 3)] * 3
    assert [t.value for t in study.trials] == [r["best_val_acc"] for r in results]
    for run in runs:
        hydra_overrides = OmegaConf.load(run / ".hydra" / "hydra.yaml").hydra.overrides.hydra
        assert not any("HYDRA_OPTUNA_TRIAL" in o for o in hydra_overrides)
    assert "Pruner: None" in proc.stdout + proc.stderr


def kill_mid_trial(command: list[str], folder: Path, trial: int) -> None:
    """Start the search and SIGKILL it, every process, once trial `trial`'s run has started."""
    search = subprocess.Popen(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill reaches every process
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(folder.glob("*/results.json"))) <= trial:
        assert search.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(search.pid, signal.SIGKILL)
    search.wait(timeout=60)


def killable_search(cifar_root, cache_dir, out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable, "-m", "cifar_exp.train", "hparams_search=optuna",
        *data_overrides(cifar_root, cache_dir, train=200, test=100), "data.val_size=50",
        "trainer.epochs=2", "logger=none", "hydra.sweeper.n_trials=2",
        "hydra.sweeper.heartbeat_interval=1", "hydra.sweeper.grace_period=2",
        f"output_root={out}", *overrides,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_search_killed_mid_trial_leaves_it_failed_when_run_again(cifar_root, cache_dir, tmp_path):
    """SIGKILL to the whole search while its first trial trains: the trial stays RUNNING in
    the study. The same command, run again after the grace period, marks it failed (its
    heartbeat stopped) and runs its own trials to the end."""
    command = killable_search(cifar_root, cache_dir, tmp_path / "out")
    folder = tmp_path / "out" / "optuna" / "cifar_exp"
    kill_mid_trial(command, folder, trial=0)
    study, _ = trials_of(folder)
    assert [t.state for t in study.trials] == [TrialState.RUNNING]

    time.sleep(3)  # past the grace period (2 s) since its last heartbeat
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    output = again.stdout + again.stderr
    assert again.returncode == 0, output
    study, _ = trials_of(folder)
    assert [t.state for t in study.trials] == [
        TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE
    ], output  # fmt: skip
    assert "Trial(s) [0] were left running by a search that stopped" in output
    best = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert best["best_value"] == study.best_value


@pytest.mark.slow
def test_a_search_of_n_trials_in_the_study_killed_goes_on_to_that_number(
    cifar_root, cache_dir, tmp_path
):
    """hydra.sweeper.trials_per=study: killed while its second trial trains, the search run
    again fails that trial and runs one more, so the study holds the 2 trials asked for; a
    third session finds them and trains nothing."""
    command = killable_search(
        cifar_root, cache_dir, tmp_path / "out", "hydra.sweeper.trials_per=study"
    )
    folder = tmp_path / "out" / "optuna" / "cifar_exp"
    kill_mid_trial(command, folder, trial=1)
    time.sleep(3)  # past the grace period
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "The study has 1 of its n_trials=2 trials" in again.stdout + again.stderr
    study, runs = trials_of(folder)
    states = [t.state for t in study.trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert not any(t.state == TrialState.RUNNING for t in study.trials)
    third = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert "The study has 2 of its n_trials=2 trials" in third.stdout + third.stderr
    assert len(trials_of(folder)[0].trials) == 3 and third.returncode == 0


def test_a_pruned_search_needs_a_database_that_the_jobs_can_open():
    median, none = (
        {"_target_": "optuna.pruners.MedianPruner"},
        {"_target_": "optuna.pruners.NopPruner"},
    )
    sweeper = OmegaConf.create
    assert config_error(sweeper({"pruner": median, "storage": "sqlite:///optuna.db"})) is None
    assert config_error(sweeper({"pruner": none, "storage": None})) is None
    assert config_error(sweeper({"storage": None})) is None  # hydra-optuna-sweeper's config
    assert config_error(sweeper({"pruner": median, "storage": None})) == (
        "hydra.sweeper.pruner needs a storage that the jobs can open, not "
        "hydra.sweeper.storage=None: set it to a database URL (sqlite:///<file>, "
        "postgresql://...), or hydra/sweeper/pruner=none"
    )


@pytest.mark.slow
def test_a_pruned_search_in_memory_stops_before_its_first_trial(tmp_path):
    proc = run_cli(
        "train", "hparams_search=optuna", "hydra.sweeper.storage=null", "data.limit_train=300",
        "data.val_size=50", f"output_root={tmp_path}", check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in output
    (line,) = [line for line in output.splitlines() if "hydra.sweeper.storage" in line]
    assert line.endswith("or hydra/sweeper/pruner=none")
    assert not list(tmp_path.rglob("train.log"))


def test_the_sweeper_is_found_from_any_folder_and_loads_no_optuna_until_a_search(tmp_path):
    """Hydra's plugin scan finds the package's sweeper through the installed package (not the
    current folder), and neither the scan (which registers its config) nor the training
    command imports Optuna: a core install without the search extra trains."""
    code = (
        "import sys; import cifar_exp.train; from hydra.core.plugins import Plugins; "
        "from hydra.plugins.sweeper import Sweeper; "
        "print([p.__name__ for p in Plugins.instance().discover(Sweeper)]); "
        "print(sorted(m for m in sys.modules if m.partition('.')[0] == 'optuna'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    sweepers, optuna_modules = proc.stdout.splitlines()
    assert "OptunaPruningSweeper" in sweepers and optuna_modules == "[]", proc.stderr


def refusing_search(cifar_root, cache_dir, out, *overrides: str) -> subprocess.CompletedProcess:
    """hparams_search=small_net for one epoch on 200 images, with the budget given."""
    return run_cli(
        "train", "hparams_search=small_net",
        *data_overrides(cifar_root, cache_dir, train=200, test=100), "data.val_size=50",
        "trainer.epochs=1", "logger=none", "trainer.tta=none", f"output_root={out}",
        *overrides, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_a_network_over_its_budget_is_refused_before_it_trains(cifar_root, cache_dir, tmp_path):
    """hparams_search=small_net with budget.max_params=150,000: the sampler (seeded) draws
    shapes above it too. Each of those is told PRUNED with why and trains nothing; the search
    ends with its two trained trials and exit 0, no failure among them."""
    proc = refusing_search(
        cifar_root, cache_dir, tmp_path, "budget.max_params=150000",
        "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=3",
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    study, runs = trials_of(tmp_path / "optuna" / "small_net")
    refused = [t for t in study.trials if "refused" in t.user_attrs]
    trained = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(trained) == 2 and len(runs) == 2 and refused, output
    assert len(refused) + len(trained) == len(study.trials)
    for trial in study.trials:  # refused exactly when the trial's network is over 150,000
        overrides = [f"{name}={value}" for name, value in trial.params.items()]
        network = instantiate(compose_train("experiment=small_best", *overrides).model)
        over = count_parameters(network) > 150_000
        assert (trial in refused) is over
        if over:
            assert trial.state == TrialState.PRUNED and not trial.intermediate_values
            assert "over budget.max_params=150,000" in trial.user_attrs["refused"]
            assert f"Trial {trial.number} refused before training" in output
    params = sorted(json.loads((run / "results.json").read_text())["params"] for run in runs)
    assert all(p <= 150_000 for p in params)


@pytest.mark.slow
def test_a_search_whose_networks_are_all_over_budget_stops_saying_so(tmp_path):
    """Every shape of small_net has over 50,000 parameters: the search stops after its
    refusals in a row, naming the key, and trains nothing."""
    proc = refusing_search(Path("/nonexistent"), tmp_path, tmp_path, "budget.max_params=50000")
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"{MAX_REFUSALS_IN_A_ROW} trials in a row were refused by hydra.sweeper." in output
    assert not list(tmp_path.rglob("train.log"))


def test_a_preset_built_on_another_drops_its_parameters_set_to_null():
    """hparams_search=s9_fast keeps optuna.yaml's storage and pruner but none of its
    parameters but the one it redefines (optimizer.lr): the sweeper reads null as left out."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        cfg = compose("train", ["hparams_search=s9_fast"], return_hydra_config=True)
    arguments = instantiate(cfg.hydra.sweeper).sweeper._parse_sweeper_params_config()
    names = [a.partition("=")[0] for a in arguments]
    assert "optimizer.lr" in names and "optimizer.filters.lr" in names
    assert not {"optimizer.weight_decay", "model.dropout", "scheduler"} & set(names)
    assert cfg.hydra.sweeper.params["scheduler"] is None  # inherited, then dropped
    assert cfg.trainer.label_smoothing == 0.2 and cfg.optimizer.filters.lr == 0.05  # s9_fast's


@pytest.mark.slow
def test_a_search_whose_every_trial_fails_ends_with_the_failures_not_a_traceback(tmp_path):
    """Every trial refuses its batch size at its own config check: each is recorded failed,
    and with no finished trial there is no best one to write (no Optuna error)."""
    preset = search_preset(
        tmp_path,
        "failing",
        "# @package _global_\ndefaults:\n  - optuna\n"
        "hydra:\n  sweeper:\n    params:\n      data.batch_size: choice(-1, -2)\n",
    )
    out = tmp_path / "out"
    proc = run_cli(
        "train", *preset,
        "data.limit_train=300", "data.val_size=50", "hydra.sweeper.n_trials=2",
        f"output_root={out}", check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    study, _ = trials_of(out / "optuna" / "cifar_exp")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2, output
    assert "No trial of the study has finished: no best trial to write" in output
    assert "Traceback" not in output and "Record does not exist" not in output
    assert "2 job(s) of the sweep failed" in output and proc.returncode == 1
    assert not (out / "optuna" / "cifar_exp" / "optimization_results.yaml").exists()


def test_a_trial_another_search_marked_failed_keeps_that_state(tmp_path):
    """A machine that paused past the grace period: another session marked its running trial
    failed. When its job returns, the sweeper says so and leaves the trial failed."""
    study = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", direction="maximize")
    trial = study.ask()
    study._storage.set_trial_state(trial._trial_id, TrialState.FAIL)
    sweeper = PruningSweeperImpl(
        sampler=None, direction="maximize", storage=None, study_name=None, n_trials=1,
        n_jobs=1, max_failure_rate=0.0, search_space=None, custom_search_space=None,
        params=None,
    )  # fmt: skip
    job = JobReturn(_return_value=0.5, status=JobStatus.COMPLETED)
    assert sweeper.tell(study, trial, job, n_objectives=1) is None
    assert study.trials[0].state == TrialState.FAIL and study.trials[0].value is None


def test_a_postgresql_study_without_its_driver_is_refused_naming_the_extra(monkeypatch):
    hide_module(monkeypatch, "psycopg2")
    sweeper = OmegaConf.create({"storage": "postgresql://search@db/studies"})
    assert config_error(sweeper) == (
        "hydra.sweeper.storage=postgresql://... needs PostgreSQL's driver, psycopg2: "
        "pip install 'cifar-exp[search]' (make install installs every extra)"
    )
    assert config_error(OmegaConf.create({"storage": "sqlite:///optuna.db"})) is None


def test_a_trial_asked_but_never_launched_is_failed_by_the_next_search(tmp_path):
    """A search killed between asking for a trial and launching its job: the trial already has
    a heartbeat, so the next session finds it stale and marks it failed."""
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1
    )
    study = optuna.create_study(storage=storage, direction="maximize")
    sweeper = PruningSweeperImpl(
        sampler=None, direction="maximize", storage=None, study_name=None, n_trials=1,
        n_jobs=1, max_failure_rate=0.0, search_space=None, custom_search_space=None,
        params=None,
    )  # fmt: skip
    distributions = {"optimizer.lr": optuna.distributions.LogUniformDistribution(0.01, 0.1)}
    trial, overrides = sweeper.ask_runnable(study, distributions, fixed={})
    assert overrides == (f"optimizer.lr={trial.params['optimizer.lr']}",)
    time.sleep(2.5)  # past the grace period, nothing beating: the session was killed
    fail_stale_trials(study)
    assert [t.state for t in study.trials] == [TrialState.FAIL]


def test_the_log_shows_a_storage_url_without_its_password():
    assert (
        shown_storage("postgresql://cifar:secret@db/studies") == "postgresql://cifar:***@db/studies"
    )
    assert shown_storage("sqlite:////tmp/optuna.db") == "sqlite:////tmp/optuna.db"
    assert shown_storage(None) == "None"
