"""BuiltRun that goes wrong: divergence, failing sweep jobs, simultaneous runs, secrets."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, data_overrides, read_metrics, run_cli

from cifar_exp.engine.run_folders import FolderInUse, claim_folder, in_use, lock
from cifar_exp.errors import DIVERGED

# Epoch 1 trains normally at lr 0.05; StepLR then multiplies the lr by 1e30 and the loss
# overflows in epoch 2.
DIVERGES_IN_EPOCH_2 = ["scheduler.lr_scheduler.step_size=1", "scheduler.lr_scheduler.gamma=1e30"]
SECRET = "wandb-key-0123456789abcdef0123456789abcdef01234567"


def small(cifar_root, cache_dir) -> list[str]:
    return [*data_overrides(cifar_root, cache_dir, train=200, test=100), "data.batch_size=25",
            "trainer.epochs=2", "data.num_workers=0"]  # fmt: skip


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_epoch_and_step(cifar_root, cache_dir, tmp_path):
    proc = run_cli("train", *small(cifar_root, cache_dir), *DIVERGES_IN_EPOCH_2,
                   f"hydra.run.dir={tmp_path}", check=False)  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == DIVERGED, output
    assert "at epoch 2, step" in output and "lower optimizer.lr" in output
    assert "Traceback" not in output and "SweepReport" not in output  # a single run's callbacks
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["state"] == "failed" and results["epochs"] == 1
    assert results["error"].startswith("the training loss became")
    last = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


@pytest.mark.slow
def test_a_failing_sweep_job_does_not_stop_the_others_and_is_listed(
    cifar_root, cache_dir, tmp_path
):
    """Job 0 diverges, job 1 trains; the secret in the environment reaches no file."""
    sweep = tmp_path / "sweep"
    proc = run_cli(
        "train", "-m", "scheduler.lr_scheduler.step_size=1",
        "scheduler.lr_scheduler.gamma=1e30,0.5", *small(cifar_root, cache_dir),
        f"hydra.sweep.dir={sweep}", check=False, env={"WANDB_API_KEY": SECRET},
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "1 job(s) of the sweep failed" in output
    report = output.split("of the sweep failed")[1]
    assert report.lstrip(":\n").startswith("job 0 (") and "gamma=1e+30" in report
    assert "the training loss became" in report and "at epoch 2, step" in report
    assert "Traceback" not in output
    (diverged,) = sweep.glob("0_*")
    (trained,) = sweep.glob("1_*")
    assert [m["epoch"] for m in read_metrics(diverged)] == [1]
    assert [m["epoch"] for m in read_metrics(trained)] == [1, 2]

    files = [p for p in sweep.rglob("*") if p.is_file()]
    assert any(".hydra" in p.parts for p in files) and any("wandb" in p.parts for p in files)
    leaks = [p for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaks


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path):
    """Both fail on their data after Hydra set up their folders (a few seconds, no training)."""
    root = tmp_path / "outputs"
    args = ["data.format=folder", "data.root=/nonexistent", f"output_root={root}"]
    procs = [
        subprocess.Popen([sys.executable, "-m", "cifar_exp.train", *args], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(2)
    ]  # fmt: skip
    assert [p.wait(timeout=120) for p in procs] == [2, 2]
    folders = sorted(root.glob("*/*"))
    assert len(folders) == 2
    assert all((f / "train.log").is_file() for f in folders)


def test_claiming_a_taken_folder_gives_a_new_one(tmp_path):
    base = tmp_path / "12-00-00"
    assert [claim_folder(base).name for _ in range(3)] == ["12-00-00", "12-00-00-2", "12-00-00-3"]


@pytest.mark.slow
def test_two_runs_started_at_once_in_one_folder_one_runs_the_other_is_refused(
    cifar_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "cifar_exp.train", *small(cifar_root, cache_dir),
             f"seed={seed}", "logger=none", f"hydra.run.dir={run_dir}"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for seed in (1, 2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], outputs
    ran, refused = (outputs[codes.index(c)] for c in (0, 2))
    assert f"another run is writing to {run_dir}" in refused, refused
    assert len(refused.strip().splitlines()) == 1 and "Traceback" not in refused
    # The folder is the run's alone: its record of the command, epochs and checkpoints.
    seed = (1, 2)[codes.index(0)]
    assert f"seed={seed}" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]
    assert (
        torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["config"]["seed"] == seed
    )


def test_a_folder_is_held_while_its_run_lives_and_free_once_it_dies(tmp_path):
    """The lock is the operating system's: a SIGKILLed holder leaves nothing to clean up."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pathlib import Path\n"
         "from cifar_exp.engine.run_folders import lock\n"
         f"held = lock(Path({str(tmp_path)!r}))\nprint('held', flush=True)\ntime.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    assert in_use(tmp_path)
    with pytest.raises(FolderInUse, match=f"another run is writing to {tmp_path}"):
        lock(tmp_path)
    holder.kill()
    holder.wait()
    assert not in_use(tmp_path)
    lock(tmp_path).release()
