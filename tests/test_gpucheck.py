"""`python -m cifar_exp.gpucheck`: it refuses clearly without a GPU, and its steps run, at
toy scale, on the CPU (the figures there mean nothing; a GPU session records them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest
from conftest import REPO, write_tree

from cifar_exp.tools.gpucheck import data_overrides, machine_data_root


def gpucheck(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cifar_exp.gpucheck", *args],
        cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


@pytest.mark.slow
def test_without_a_gpu_it_refuses_in_one_line():
    proc = gpucheck(env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("gpucheck needs a CUDA GPU, and PyTorch sees none here")


@pytest.mark.slow
def test_an_unknown_step_is_refused():
    proc = gpucheck("--steps", "smoke,warp", "--device", "cpu")
    assert proc.returncode == 2 and "unknown steps ['warp']" in proc.stderr


@pytest.mark.slow
def test_its_steps_run_on_the_cpu(cifar_root, cache_dir, tmp_path):
    """The sync audit, the deterministic pair and the resume (stopped by SIGTERM after epoch 1,
    resumed, and resumed again on the CPU), as on a GPU."""
    proc = gpucheck(
        "--device", "cpu", "--steps", "syncs,deterministic,resume", "--images", "300",
        "--data", str(cifar_root), "--work", str(tmp_path), f"data.cache_dir={cache_dir}",
        "trainer.threads=1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpucheck.json").read_text())
    steps = report["steps"]
    assert {name: step["result"] for name, step in steps.items()} == {
        "syncs": "ok", "deterministic": "ok", "resume": "ok"
    }  # fmt: skip
    assert steps["syncs"]["waits"] <= steps["syncs"]["allowed"]
    assert steps["deterministic"]["identical"] and steps["resume"]["resumed_equals_whole"]
    assert "resume-on-cpu" in os.listdir(tmp_path)
    for name in ("syncs", "deterministic", "resume"):
        assert any(
            line.startswith(f"{name} ") and " ok " in line for line in proc.stdout.splitlines()
        )


def test_data_may_be_a_folder_tree_the_official_folder_or_an_archive(tmp_path):
    tree = write_tree(tmp_path / "tree", {"train": ["a", "b"], "test": ["a", "b"]})
    assert data_overrides(tree, tmp_path)[1] == "data.format=folder"
    assert data_overrides(tmp_path / "official", tmp_path)[1] == "data.format=official"
    with tarfile.open(tmp_path / "copy.tar.gz", "w:gz") as archive:
        for split in ("train", "test"):
            archive.add(tree / split, arcname=split)
    root, fmt = data_overrides(tmp_path / "copy.tar.gz", tmp_path / "work")
    (unpacked,) = (tmp_path / "work").glob("copy-*")
    assert fmt == "data.format=folder" and root == f"data.root={unpacked}"
    assert sorted(os.listdir(unpacked / "train")) == ["a", "b"]


def test_without_data_it_reads_the_machines_data_location(tmp_path, monkeypatch):
    """--data defaults to where training reads the data: CIFAR_DATA here."""
    monkeypatch.setenv("CIFAR_DATA", str(tmp_path / "cifar.tar.gz"))
    assert machine_data_root() == tmp_path / "cifar.tar.gz"
