"""Every kind of bad input ends with a short message naming problem and fix, a non-zero exit,
no traceback, and nothing in the run folder beyond the log. None of these loads the data set."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from cifar_exp.models import ConvNet

LOG_ONLY = {"train.log", ".hydra"}


def assert_refused(proc, expected: str, run_dir: Path | None = None, code: int | None = None):
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0 if code is None else proc.returncode == code, output
    assert expected in output, output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) <= 12, output
    if run_dir is not None and run_dir.exists():
        assert {p.name for p in run_dir.iterdir()} <= LOG_ONLY


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=nonexistent"], "Could not find 'model/nonexistent'"),
        (["trainer.fast=true"], "Could not override 'trainer.fast'"),
        (["trainer.epochs=ten"], "trainer.epochs='ten': Input should be a valid integer"),
        (["trainer.epochs=0"], "trainer.epochs=0: Input should be greater than 0"),
        (["optimizer.lr=-1"], "optimizer.lr=-1: Input should be greater than 0"),
        (["data.batch_size=0"], "data.batch_size=0: Input should be greater than 0"),
        (["model.dropout=1.0"], "model.dropout=1.0: Input should be less than 1"),
        (["model.dropout=-0.1"], "model.dropout=-0.1: Input should be greater than or equal"),
        (["data.format=folder", "data.root=/nonexistent/cifar"], "data.root=/nonexistent/cifar"),
        (["scheduler=plateau", "scheduler.monitor=val_acc"], "scheduler.monitor=val_acc"),
        (["model.max_params=100000"], "180,298 parameters, over model.max_params=100,000"),
        (["trainer.precision=fp8"], "trainer.precision='fp8': Input should be 'auto', 'bf16'"),
        (["trainer.label_smoothing=1"], "trainer.label_smoothing=1: Input should be less than 1"),
    ],
)
def test_bad_config_is_refused_before_anything_runs(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", *overrides, f"hydra.run.dir={run_dir}", check=False)
    assert_refused(proc, expected, run_dir)


def test_every_bad_value_is_named_at_once(tmp_path):
    proc = run_cli("train", "trainer.epochs=0", "data.batch_size=0", f"hydra.run.dir={tmp_path}",
                   check=False)  # fmt: skip
    assert_refused(proc, "trainer.epochs=0", code=2)
    assert "data.batch_size=0" in proc.stdout + proc.stderr


def write_tree(root: Path, classes: dict[str, list[str]]) -> Path:
    """root/{train,test}/<class>/<n>.png; an image named 'broken' is not an image."""
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes[split]:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def folder_data(root: Path) -> list[str]:
    return [f"data.root={root}", "data.format=folder", "data.cache_dir=null",
            "data.num_workers=0", "model.num_classes=2"]  # fmt: skip


def test_a_class_missing_from_one_split_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat"]})
    proc = run_cli("train", *folder_data(root), f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert_refused(proc, "only in one split: dog", tmp_path / "run", code=2)


def test_fewer_classes_than_the_model_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    overrides = [*folder_data(root)[:-1], f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("train", *overrides, check=False)
    assert_refused(proc, "the data has 2 classes (cat, dog) but model.num_classes=10",
                   tmp_path / "run", code=2)  # fmt: skip


def test_an_unreadable_image_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    broken = root / "train" / "dog" / "1.png"
    broken.write_bytes(b"not an image")
    proc = run_cli("train", *folder_data(root), f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert_refused(proc, f"cannot read image {broken}", tmp_path / "run", code=2)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_official_batch_file_is_named(tmp_path, damage):
    """The official python batches, one of them damaged (the others need not be real)."""
    batches = tmp_path / "data" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]:  # fmt: skip
        (batches / name).write_bytes(pickle.dumps({"data": np.zeros((2, 3072), np.uint8)}))
    target = batches / "data_batch_3"
    target.write_bytes(target.read_bytes()[:20] if damage == "truncated" else os.urandom(64))
    proc = run_cli("train", f"data.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert_refused(proc, f"{batches} is truncated or corrupted", tmp_path / "run", code=2)


def test_an_unwritable_output_folder_is_named_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("train", f"output_root={blocker / 'outputs'}", check=False)
    assert_refused(proc, f"cannot write the run folder {blocker / 'outputs'}", code=2)
    assert "output_root=<folder>" in proc.stdout + proc.stderr


def saved_run(tmp_path: Path, model_state: dict | None = None) -> Path:
    """A run folder whose last.pt has the default config and, unless given, matching weights."""
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.progress=false"])
    config = OmegaConf.to_container(cfg, resolve=True)
    model = ConvNet(cfg.model.blocks)
    state = {"model": model_state or model.state_dict(), "optimizer": {}, "scheduler": {},
             "epoch": 1, "best_test_acc": 0.1, "config": config}  # fmt: skip
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save(state, run_dir / "checkpoints" / "last.pt")
    return run_dir


class RunsCode:
    """Unpickling this runs a shell command: what weights_only loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def damage_checkpoint(run_dir: Path, how: str, tmp_path: Path) -> None:
    last = run_dir / "checkpoints" / "last.pt"
    if how == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif how == "not a checkpoint":
        torch.save({"weights": torch.zeros(3)}, last)
    elif how == "text":
        last.write_text("hello")
    elif how == "runs code":
        torch.save({"model": RunsCode(tmp_path / "pwned")}, last)


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("missing", "no such checkpoint file"),
        ("truncated", "is truncated or not a checkpoint"),
        ("text", "is truncated or not a checkpoint"),
        ("not a checkpoint", "is not a checkpoint written by cifar_exp.train"),
        ("runs code", "needs arbitrary code to load and was refused"),
    ],
)
def test_a_bad_checkpoint_is_refused(how, expected, tmp_path):
    run_dir = saved_run(tmp_path)
    if how == "missing":
        run_dir = tmp_path / "elsewhere"
    damage_checkpoint(run_dir, how, tmp_path)
    before = sorted(p.name for p in run_dir.rglob("*")) if run_dir.exists() else []
    proc = run_cli("train", f"trainer.resume={run_dir}", check=False)
    assert_refused(proc, expected, code=2)
    after = sorted(p.name for p in run_dir.rglob("*")) if run_dir.exists() else []
    assert after == before  # refused before Hydra wrote anything
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    other = ConvNet([{"convs": [8], "transition": {"channels": 16, "type": "strided"}}])
    run_dir = saved_run(tmp_path, other.state_dict())
    proc = run_cli("train", f"trainer.resume={run_dir}", check=False)
    assert_refused(proc, "holds the weights of another model", code=2)
    assert "Missing key(s)" in proc.stdout + proc.stderr or "size mismatch" in proc.stdout


def test_evaluate_refuses_a_checkpoint_that_runs_code(tmp_path):
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(tmp_path / "pwned")}, ckpt)
    proc = run_cli("evaluate", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_refused(proc, "needs arbitrary code to load and was refused", code=2)
    assert not (tmp_path / "pwned").exists()
