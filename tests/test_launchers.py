"""Hydra launchers: the jobs of a multirun in parallel processes (joblib), through submitit on
this machine (submitit_local), and a SLURM job array's configuration (slurm)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import submitit
import torch
from conftest import CONF, REPO, data_overrides, read_metrics, run_cli, wandb_records
from hydra import compose, initialize_config_dir
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from cifar_exp.track.record import epochs_kept


def sweep(out, *overrides, cifar_root, cache_dir):
    """A multirun of two 1-epoch jobs on 200 real images and one job that fails (lr -1)."""
    proc = run_cli(
        "train", "-m", *overrides, *data_overrides(cifar_root, cache_dir, train=200, test=100),
        "trainer.epochs=1", "optimizer.lr=0.01,0.02,-1", f"output_root={out}", check=False,
    )  # fmt: skip
    (sweep_dir,) = (out / "multirun").glob("*/*")
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    return proc, sweep_dir, jobs


def check_sweep(proc, jobs):
    """Three folders of their own; the two good jobs trained; the failed one is reported."""
    assert [p.name[:2] for p in jobs] == ["0_", "1_", "2_"]
    assert [len(read_metrics(p)) for p in jobs[:2]] == [1, 1]
    assert not (jobs[2] / "metrics.jsonl").exists()
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "1 job(s) of the sweep failed:\njob 2 (" in output
    assert "optimizer.lr=-1: Input should be greater than 0" in output
    assert "Traceback" not in output


@pytest.mark.slow
def test_joblib_runs_jobs_in_parallel_processes_grouped_in_wandb(cifar_root, cache_dir, tmp_path):
    proc, sweep_dir, jobs = sweep(
        tmp_path, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        cifar_root=cifar_root, cache_dir=cache_dir,
    )  # fmt: skip
    check_sweep(proc, jobs)
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    runs = [[r["run"] for r in wandb_records(job) if r["type"] == "run"][0] for job in jobs[:2]]
    assert runs[0]["run_group"] == runs[1]["run_group"] == sweep_dir.as_posix().replace("/", "-")
    assert runs[0]["run_id"] != runs[1]["run_id"]
    assert not list(sweep_dir.glob(".failed-jobs-*"))  # read back and removed


@pytest.mark.slow
def test_submitit_local_runs_each_job_as_a_submitit_job(cifar_root, cache_dir, tmp_path):
    proc, sweep_dir, jobs = sweep(
        tmp_path, "hydra/launcher=submitit_local", "logger=none",
        cifar_root=cifar_root, cache_dir=cache_dir,
    )  # fmt: skip
    check_sweep(proc, jobs)
    results = list(sweep_dir.glob(".submitit/*/*_result.pkl"))
    assert len(results) == 3  # one submitit job each, its result pickled back


def children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in found.split()]


@pytest.mark.slow
def test_submitit_requeues_a_job_on_its_pre_timeout_signal_and_it_resumes(
    cifar_root, cache_dir, tmp_path
):
    """SIGUSR2 (what SLURM sends before the time limit) to a training submitit job: the job
    saves interrupted.pt, submitit's handler requeues it, and the job started again continues
    from last.pt in its own folder and W&B run."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cifar_exp.train", "-m", "hydra/launcher=submitit_local",
         *data_overrides(cifar_root, cache_dir, train=1500, test=100), "data.batch_size=50",
         "trainer.epochs=3", "trainer.device=cpu", f"output_root={tmp_path}"],
        cwd=REPO, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not any(epochs_kept(job) for job in tmp_path.glob("multirun/*/*/0_*")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.02)
    (job_dir,) = tmp_path.glob("multirun/*/*/0_*")
    # This process, then submitit's controller, then the job training in it.
    (job,) = [task for controller in children(proc.pid) for task in children(controller)]
    time.sleep(0.3)  # into epoch 2 (30 steps of seconds in all)
    os.kill(job, signal.SIGUSR2)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output

    stopped = torch.load(job_dir / "checkpoints" / "interrupted.pt", weights_only=True)
    assert stopped["epoch"] == 2 and stopped["step"] >= 1
    logs = "".join(p.read_text() for p in job_dir.parent.glob(".submitit/*/*_log.*"))
    assert "SIGUSR2 received: stopped after epoch 2" in logs
    assert "Requeued job" in logs
    assert f"Resuming {job_dir} after epoch 1" in logs
    assert [m["epoch"] for m in read_metrics(job_dir)] == [1, 2, 3]
    jobs = [p.name[:2] for p in job_dir.parent.iterdir() if p.is_dir() and p.name[0] != "."]
    assert jobs == ["0_"]  # no folder of its own for the job started again
    # One W&B run, two sessions (offline: a folder each), the first ended by the signal.
    records = wandb_records(job_dir)
    assert len(list(job_dir.glob("wandb/offline-run-*"))) == 2
    assert len({r["run"]["run_id"] for r in records if r["type"] == "run"}) == 1
    exits = [r["exit"]["exit_code"] for r in records if r["type"] == "exit"]
    assert exits == [LOCAL_REQUEUE_RETURN_CODE, 0]


def test_slurm_config_reaches_the_sbatch_script(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        overrides = ["hydra/launcher=slurm", "hydra.launcher.partition=short"]
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher)
    assert params.pop("_target_").endswith("submitit_launcher.SlurmLauncher")
    # What SlurmLauncher.launch does with them, up to sbatch (needs no cluster but srun).
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    for key in ("submitit_folder", "max_num_timeout"):
        params.pop(key)
    params["name"] = "train"
    base = set(OmegaConf.structured(BaseQueueConf))
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m cifar_exp.train", "uid")
    for line in ("--partition=short", "--gpus-per-node=1", "--time=240", "--cpus-per-task=4",
                 "--ntasks-per-node=1", "--mem=16GB"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert executor._executor.parameters["array_parallelism"] == 8
