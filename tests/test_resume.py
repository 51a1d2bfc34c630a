"""Runs that survive: killed or stopped mid-epoch and resumed, they end as if left alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, data_overrides, read_metrics, run_cli, wandb_records

from cifar_exp import checkpoint

TIMING = {"epoch_seconds", "images_per_second"}


def recipe(cifar_root, cache_dir, run_dir: Path) -> list[str]:
    """Three deterministic CPU epochs of 30 steps, with dropout and augmentation."""
    return [
        *data_overrides(cifar_root, cache_dir, train=1500, test=100),
        "data.batch_size=50",
        "trainer.epochs=3",
        "trainer.device=cpu",
        "trainer.deterministic=true",
        f"hydra.run.dir={run_dir}",
    ]


def start(overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cifar_exp.train", *overrides],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stop_during_epoch_2(proc: subprocess.Popen, run_dir: Path, signum: int) -> str:
    """Wait for epoch 1's checkpoint, let epoch 2 start, then send `signum`."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "epoch 1 never finished"
        time.sleep(0.02)
    time.sleep(0.3)  # a few of epoch 2's 30 steps (an epoch takes seconds here)
    os.kill(proc.pid, signum)
    output, _ = proc.communicate(timeout=120)
    assert metrics.read_text().count("\n") == 1, "the signal came after epoch 2 ended"
    return output


def without_timing(metrics: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


def final_weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def assert_same_run(resumed: Path, reference: Path) -> None:
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(reference))
    weights, expected = final_weights(resumed), final_weights(reference)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def uninterrupted(cifar_root, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    run_cli("train", *recipe(cifar_root, cache_dir, run_dir))
    return run_dir


def test_killed_mid_epoch_and_resumed_ends_exactly_as_left_alone(
    uninterrupted, cifar_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "killed"
    proc = start(recipe(cifar_root, cache_dir, run_dir))
    stop_during_epoch_2(proc, run_dir, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == 1

    run_cli("train", f"trainer.resume={run_dir}", "trainer.progress=false")
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert_same_run(run_dir, uninterrupted)

    # The same W&B run continues: one run id, no epoch logged twice. (W&B offline holds the
    # last logged row in its service until the next step, so a SIGKILL may lose epoch 1 there;
    # metrics.jsonl has every epoch.)
    records = wandb_records(run_dir)
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 2  # offline: one folder a session
    ids = {r["run"]["run_id"] for r in records if r["type"] == "run"}
    assert len(ids) == 1
    epochs = [r["history"]["item"].get("epoch") for r in records if r["type"] == "history"]
    logged = [e for e in epochs if e is not None]
    assert {2, 3} <= set(logged) and len(logged) == len(set(logged))


def test_sigterm_finishes_the_step_saves_and_resumes_exactly(
    uninterrupted, cifar_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "stopped"
    proc = start(recipe(cifar_root, cache_dir, run_dir))
    output = stop_during_epoch_2(proc, run_dir, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM, output
    assert "SIGTERM received: stopped after epoch 2, step" in output
    assert "Traceback" not in output
    stopped = checkpoint.load(run_dir / "checkpoints" / "interrupted.pt")
    assert stopped["epoch"] == 2 and stopped["step"] >= 1
    exits = [r["exit"] for r in wandb_records(run_dir) if r["type"] == "exit"]
    assert [e["exit_code"] for e in exits] == [128 + signal.SIGTERM]

    run_cli("train", f"trainer.resume={run_dir}", "trainer.progress=false")
    assert_same_run(run_dir, uninterrupted)


def test_resume_auto_finds_the_newest_run_with_the_same_config(
    uninterrupted, cifar_root, cache_dir, tmp_path
):
    """output_root holds the run; auto picks it by config and continues (nothing left to do)."""
    root = tmp_path / "outputs"
    args = recipe(cifar_root, cache_dir, tmp_path)[:-1]  # no hydra.run.dir: default folders
    run_cli("train", *args, "trainer.epochs=1", f"output_root={root}")
    (first,) = root.glob("*/*")
    proc = run_cli("train", *args, "trainer.epochs=1", f"output_root={root}", "trainer.resume=auto")
    assert list(root.glob("*/*")) == [first]  # no new run folder
    assert f"Resuming {first} after epoch 1" in proc.stdout + proc.stderr
    assert [m["epoch"] for m in read_metrics(first)] == [1]
    other = run_cli(
        "train", *args, "trainer.epochs=2", f"output_root={root}", "trainer.resume=auto",
        check=False,
    )  # fmt: skip
    assert other.returncode == 2
    assert "no run under output_root" in other.stdout + other.stderr


def test_rewind_drops_epochs_after_the_checkpoint_and_partial_lines(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n{"epo')
    assert checkpoint.rewind_metrics(metrics, 2) == [{"epoch": 1}, {"epoch": 2}]
    assert metrics.read_text() == '{"epoch": 1}\n{"epoch": 2}\n'
