"""Runs that survive: killed or stopped mid-epoch and resumed, they end as if left alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    compose_train,
    data_overrides,
    read_metrics,
    run_cli,
    wandb_records,
)
from hydra.utils import get_object

from cifar_exp.engine import checkpoint, preflight, resume
from cifar_exp.engine.build import build
from cifar_exp.track.record import epochs_kept

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
    """Wait for epoch 1's checkpoints (results.json comes after them), let epoch 2 start,
    then send `signum`."""
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while epochs_kept(run_dir) < 1:
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


@pytest.mark.slow
def test_killed_mid_epoch_and_resumed_ends_exactly_as_left_alone(
    uninterrupted, cifar_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "killed"
    proc = start(recipe(cifar_root, cache_dir, run_dir))
    stop_during_epoch_2(proc, run_dir, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    old_format = tmp_path / "old-format"
    shutil.copytree(run_dir, old_format)

    output = resume_counting_loads(run_dir)
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert_same_run(run_dir, uninterrupted)
    # The checkpoint is read once (the Hydra callback only checks that it is there).
    assert output.count(f"torch.load {run_dir / 'checkpoints' / 'last.pt'}") == 1, output

    # A checkpoint as the versions before the run record wrote it resumes the same way.
    write_old_format(old_format / "checkpoints" / "last.pt")
    run_cli("train", f"trainer.resume={old_format}", "trainer.progress=false")
    assert_same_run(old_format, uninterrupted)

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


@pytest.mark.slow
def test_killed_with_a_weight_average_resumes_exactly(cifar_root, cache_dir, tmp_path):
    average = ["trainer.ema.decay=0.9", "trainer.ema.every=7"]  # steps 7, 14, 21, 28 of each epoch
    reference = tmp_path / "left-alone"
    run_cli("train", *recipe(cifar_root, cache_dir, reference), *average)
    run_dir = tmp_path / "killed"
    stop_during_epoch_2(start([*recipe(cifar_root, cache_dir, run_dir), *average]), run_dir,
                        signal.SIGKILL)  # fmt: skip
    run_cli("train", f"trainer.resume={run_dir}", "trainer.progress=false")
    assert_same_run(run_dir, reference)  # the tested (averaged) weights' metrics too
    averaged = [checkpoint.load(d / "checkpoints" / "last.pt")["ema"] for d in (run_dir, reference)]
    assert averaged[0].keys() == averaged[1].keys()
    assert all(torch.equal(averaged[0][k], averaged[1][k]) for k in averaged[1])


def resume_counting_loads(run_dir: Path) -> str:
    """`python -m cifar_exp.train trainer.resume=<run_dir>`, printing every torch.load."""
    script = (
        "import sys, torch\n"
        "real = torch.load\n"
        "def counted(f, *a, **k):\n"
        "    print('torch.load', f, flush=True)\n"
        "    return real(f, *a, **k)\n"
        "torch.load = counted\n"
        "from cifar_exp.train import main\n"
        "main()\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, f"trainer.resume={run_dir}", "trainer.progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def write_old_format(path: Path) -> None:
    """Rewrite a checkpoint as cifar_exp wrote them before its run record: budget keys in
    `model`, no monitor, image size or runtime keys, best_test_acc at the top level."""
    state = torch.load(path, weights_only=True)
    config = state["config"]
    config["model"].update(config.pop("budget"))
    del config["runtime_keys"], config["trainer"]["monitor"], config["data"]["image_size"]
    state["best_test_acc"] = state.pop("monitor")["best_value"]
    state["scaler"] = {}
    torch.save(state, path)


@pytest.mark.slow
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
    assert json.loads((run_dir / "results.json").read_text())["state"] == "stopped"
    # The best so far is epoch 1's, as in last.pt (once recorded as -1.0 here).
    (epoch_1,) = read_metrics(run_dir)
    assert stopped["monitor"] == checkpoint.load(run_dir / "checkpoints" / "last.pt")["monitor"]
    assert stopped["monitor"] == {
        "metric": "test_acc", "best_epoch": 1, "best_value": epoch_1["test_acc"]
    }  # fmt: skip
    exits = [r["exit"] for r in wandb_records(run_dir) if r["type"] == "exit"]
    assert [e["exit_code"] for e in exits] == [128 + signal.SIGTERM]

    run_cli("train", f"trainer.resume={run_dir}", "trainer.progress=false")
    assert_same_run(run_dir, uninterrupted)


@pytest.mark.slow
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


def test_optimizer_state_follows_the_model_to_its_device(
    uninterrupted, cifar_root, cache_dir, tmp_path
):
    """Restored once the model is on its device: here `meta`, which stands for any device
    other than the CPU the checkpoint was read to (a GPU, cuda:1, MPS)."""
    cfg = compose_train(
        *data_overrides(cifar_root, cache_dir, train=100, test=100), "trainer.device=meta",
        f"trainer.resume={uninterrupted}",
    )  # fmt: skip
    resumed = resume.load(cfg, uninterrupted, [f"trainer.resume={uninterrupted}"], {})
    resumed.config.trainer.device = "meta"
    # Per-image augmentation: its loader keeps the images on the CPU, where its random-number
    # generator can live (there is none on meta).
    resumed.config.augment = compose_train("augment=s9").augment
    built = build(resumed.config, preflight.check(resumed.config), resumed=resumed)
    optimizer = built.learner.optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert {p.device.type for p in params} == {"meta"}
    buffers = [s["momentum_buffer"] for s in optimizer.state.values()]
    assert len(buffers) == len(params) and {b.device.type for b in buffers} == {"meta"}


def test_an_earlier_versions_config_is_brought_up_to_date():
    """The budget keys moved out of `model`; targets were renamed, then their modules moved
    into the layered packages: each old target names today's object."""
    old = {"model": {"_target_": "cifar_exp.models.ConvNet", "blocks": [], "max_params": 1000,
                     "min_rf": 5, "norm": {"_target_": "cifar_exp.models.group_norm"}},
           "augment": {"_target_": "cifar_exp.augment.pipeline", "before_normalize": [
               {"_target_": "albumentations.HorizontalFlip"}]},
           "optimizer": {"_target_": "cifar_exp.optim.MuonForFilters"},
           "scheduler": {"lr_scheduler": {"_target_": "cifar_exp.optim.WarmupLinear"}}}  # fmt: skip
    new = checkpoint.migrate(old)
    assert new["budget"] == {"max_params": 1000, "min_rf": 5}
    assert new["model"].keys() == {"_target_", "blocks", "norm"}  # the limits left the model
    assert new["augment"]["_target_"] == "cifar_exp.data.augment.Pipeline"
    assert new["augment"]["before_normalize"][0]["_target_"] == "albumentations.HorizontalFlip"
    assert new["model"]["_target_"] == "cifar_exp.model.convnet.ConvNet"
    targets = [new["model"]["_target_"], new["model"]["norm"]["_target_"],
               new["augment"]["_target_"], new["optimizer"]["_target_"],
               new["scheduler"]["lr_scheduler"]["_target_"]]  # fmt: skip
    assert [get_object(t).__module__ for t in targets] == [
        "cifar_exp.model.convnet", "cifar_exp.model.convnet", "cifar_exp.data.augment",
        "cifar_exp.engine.optim", "cifar_exp.engine.optim",
    ]  # fmt: skip
    assert old["model"]["max_params"] == 1000  # the given config is left as it was


@pytest.mark.slow
def test_a_job_started_again_in_its_folder_continues_there(cifar_root, cache_dir, tmp_path):
    """What submitit's requeue does: the same command in the folder that holds its checkpoint
    continues the run; a run of another config there is refused before any work."""
    args = [
        *data_overrides(cifar_root, cache_dir, train=100, test=100),
        "trainer.device=cpu", "logger=none", f"hydra.run.dir={tmp_path}",
    ]  # fmt: skip
    run_cli("train", *args, "trainer.epochs=1")
    again = run_cli("train", *args, "trainer.epochs=1")
    assert f"Resuming {tmp_path} after epoch 1" in again.stdout + again.stderr
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1]
    other = run_cli("train", *args, "trainer.epochs=2", check=False)
    assert other.returncode == 2, other.stdout + other.stderr
    assert f"the run folder {tmp_path} already holds another run's checkpoint" in (
        other.stdout + other.stderr
    )
    assert [m["epoch"] for m in read_metrics(tmp_path)] == [1]
