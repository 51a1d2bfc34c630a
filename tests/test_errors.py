"""Every kind of bad input ends with a short message naming problem and fix, a non-zero exit,
no traceback, and nothing in the run folder beyond the log. None of these loads the data set,
except the few that only the data can tell."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_train, run_cli, write_tree
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_exp.engine import preflight
from cifar_exp.engine.build import build
from cifar_exp.errors import UserError
from cifar_exp.model.convnet import ConvNet

LOG_ONLY = {"train.log", ".hydra", ".lock"}  # .lock: the folder's lock, held while it ran


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
        (["budget.max_params=100000"], "180,298 parameters, over budget.max_params=100,000"),
        (["trainer.precision=fp8"], "trainer.precision='fp8': Input should be 'auto', 'fp32'"),
        (["trainer.label_smoothing=1"], "trainer.label_smoothing=1: Input should be less than 1"),
        (["scheduler.interval=batch"], "scheduler.interval='batch': Input should be 'epoch' or"),
        (["augment.cutout_p=0.5", "augment.cutout_size=40"],
         "augment.cutout_size=40 is larger than the 32-pixel images"),
        (["augment.flip_p=2"], "augment.flip_p=2 is a probability: choose it in [0, 1]"),
        # Hydra's own hint for trainer.epoch=3 is the + below: refused as well, not ignored.
        (["+trainer.epoch=3"], "unknown config key trainer.epoch: did you mean trainer.epochs?"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_bad_config_is_refused_before_anything_runs(overrides, expected, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("train", *overrides, f"hydra.run.dir={run_dir}", check=False)
    assert_refused(proc, expected, run_dir)


# Values that PyTorch, NumPy or albumentations once refused only mid-run, or never: the gate
# (checked in-process; the cases above show that a refusal ends the command cleanly).
GATE = [
    (["scheduler=onecycle", "scheduler.lr_scheduler.epochs=5", "trainer.epochs=10"],
     "scheduler.lr_scheduler cannot schedule trainer.epochs=10 epochs (Tried to step 6"),
    (["scheduler=cosine", "scheduler.lr_scheduler.T_max=0"],
     "scheduler.lr_scheduler cannot schedule trainer.epochs=50 epochs"),
    (["scheduler.lr_scheduler.step_size=0"], "cannot schedule trainer.epochs=50 epochs (integer"),
    (["trainer.monitor=val_acc"], "trainer.monitor=val_acc is not a metric of this run"),
    (["trainer.monitor=lr"], "trainer.monitor='lr': Input should be 'train_loss'"),
    (["augment.scale=[1.1]"], "augment.scale=[1.1] must be [low, high]"),
    (["augment=s9", "augment.after_normalize.0.hole_height_range=[40,40]"],
     "augment: CoarseDropout cannot run on 32x32 images (data.image_size)"),
    (["data.mean=[0.5,0.5]"], "need one value per image channel (model.in_channels=3)"),
    (["data.std=[0.2,0,0.2]"], "data.std.1=0: Input should be greater than 0"),
    (["data.limit_train=5"], "data.limit_train=5 is fewer images than the 10 classes"),
    (["data.val_size=500", "data.limit_train=400"],
     "data.val_size=500 leaves no training images of data.limit_train=400"),
    (["data.format=hdf5"], "data.format='hdf5': Input should be 'auto', 'official' or 'folder'"),
    (["seed=-1"], "seed=-1: Input should be greater than or equal to 0"),
    (["trainer.device=gpu"], "trainer.device='gpu': Value error, not a device"),
    (["trainer.device=cuda:99"], "trainer.device=cuda:99, but PyTorch sees"),
    (["trainer.early_stopping.patience=0"],
     "trainer.early_stopping.patience=0: Input should be greater than 0"),
    (["trainer.profile_steps=-5"], "trainer.profile_steps=-5: Input should be greater than 0"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+trainer.epoch=3", "unknown config key trainer.epoch: did you mean trainer.epochs?"),
        ("+epochs=3", "unknown config key epochs: did you mean trainer.epochs?"),
        (
            "+data.limt_train=3",
            "unknown config key data.limt_train: did you mean data.limit_train?",
        ),
        (
            "+trainer.ema.decy=0.9",
            "unknown config key trainer.ema.decy: did you mean trainer.ema.decay?",
        ),
        ("+colour=red", "unknown config key colour: it is not in the config"),
    ],
)
def test_an_unknown_key_is_refused_with_the_nearest_known_one(override, expected):
    with pytest.raises(UserError) as err:
        preflight.check(compose_train(override))
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "override",
    [
        "+model.blocks.1.dropout=0.1",  # the free-form sections: their classes check them
        "+model.transition.dilated_nostride.dilation=5",
        "+optimizer.maximize=false",
        "+scheduler.lr_scheduler.last_epoch=-1",
        "augment.rotate=10",
    ],
)
def test_the_free_form_sections_take_new_keys(override):
    assert preflight.check(compose_train(override))


@pytest.mark.parametrize(("overrides", "expected"), GATE)
def test_the_gate_refuses_values_that_would_fail_late(overrides, expected):
    with pytest.raises((UserError, InstantiationException)) as err:
        preflight.check(compose_train(*overrides))
    assert expected in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optimizer.momentum=-1"], "optimizer: SGD rejected its config"),
        (["experiment=s9_fast", "optimizer=sgd"], "drop it with ~optimizer.filters"),
        (["model.transition.type=dilated_nostride",
          "+model.transition.dilated_nostride.dilation=9"],
         "the network cannot run on 3x32x32 images"),
    ],
)  # fmt: skip
def test_values_the_network_or_optimizer_refuses_stop_before_the_data_loads(overrides, expected):
    cfg = compose_train(*overrides, "data.format=folder", "data.root=/nonexistent")
    with pytest.raises(UserError, match=re.escape(expected)):
        build(cfg, preflight.check(cfg))


@pytest.mark.slow
def test_every_bad_value_is_named_at_once(tmp_path):
    proc = run_cli("train", "trainer.epochs=0", "data.batch_size=0", f"hydra.run.dir={tmp_path}",
                   check=False)  # fmt: skip
    assert_refused(proc, "trainer.epochs=0", code=2)
    assert "data.batch_size=0" in proc.stdout + proc.stderr


def folder_data(root: Path) -> list[str]:
    return [f"data.root={root}", "data.format=folder", "data.cache_dir=null",
            "data.num_workers=0", "model.num_classes=2"]  # fmt: skip


@pytest.mark.slow
def test_a_class_missing_from_one_split_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat"]})
    proc = run_cli("train", *folder_data(root), f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert_refused(proc, "only in one split: dog", tmp_path / "run", code=2)


@pytest.mark.slow
def test_fewer_classes_than_the_model_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    overrides = [*folder_data(root)[:-1], f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("train", *overrides, check=False)
    assert_refused(proc, "the data has 2 classes (cat, dog) but model.num_classes=10",
                   tmp_path / "run", code=2)  # fmt: skip


@pytest.mark.slow
def test_an_unreadable_image_is_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    broken = root / "train" / "dog" / "0001.png"
    broken.write_bytes(b"not an image")
    proc = run_cli("train", *folder_data(root), f"hydra.run.dir={tmp_path / 'run'}",
                   check=False)  # fmt: skip
    assert_refused(proc, f"cannot read image {broken}", tmp_path / "run", code=2)


@pytest.mark.slow
def test_images_of_another_size_are_named(tmp_path):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"], "test": ["cat", "dog"]})
    overrides = [*folder_data(root), "data.image_size=28", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("train", *overrides, check=False)
    assert_refused(proc, "the images are 32x32 with 3 channels, but the config says 28x28",
                   tmp_path / "run", code=2)  # fmt: skip


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.slow
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


@pytest.mark.slow
def test_an_unwritable_output_folder_is_named_and_nothing_is_created(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_cli("train", f"output_root={blocker / 'outputs'}", check=False)
    assert_refused(proc, f"cannot write the folder {blocker / 'outputs'}", code=2)
    assert "output_root=<folder>" in proc.stdout + proc.stderr


def saved_run(tmp_path: Path, model_state: dict | None = None) -> Path:
    """A run folder whose last.pt has the default config and, unless given, matching weights."""
    cfg = compose_train("trainer.progress=false")
    config = OmegaConf.to_container(cfg, resolve=True)
    model = instantiate(cfg.model)
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
@pytest.mark.slow
def test_a_bad_checkpoint_is_refused(how, expected, tmp_path):
    run_dir = saved_run(tmp_path)
    if how == "missing":
        run_dir = tmp_path / "elsewhere"
    damage_checkpoint(run_dir, how, tmp_path)
    before = run_files(run_dir)
    proc = run_cli("train", f"trainer.resume={run_dir}", check=False)
    assert_refused(proc, expected, code=2)
    assert run_files(run_dir) == before  # nothing but the log and Hydra's record of the try
    assert run_dir.exists() == (how != "missing")  # no folder made for a mistyped path
    assert not (tmp_path / "pwned").exists()


def run_files(run_dir: Path) -> dict[str, bytes]:
    """The run folder's files and their bytes, less Hydra's log and records and the lock."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.name not in ("train.log", ".lock") and ".hydra" not in p.parts
    }


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_before_the_data_loads(tmp_path):
    other = ConvNet([{"convs": [8], "transition": {"channels": 16, "type": "strided"}}])
    run_dir = saved_run(tmp_path, other.state_dict())
    proc = run_cli(
        "train", f"trainer.resume={run_dir}", "data.root=/nonexistent", "data.format=folder",
        check=False,
    )  # fmt: skip
    assert_refused(proc, "holds the weights of another model", code=2)
    assert "Missing key(s)" in proc.stdout + proc.stderr or "size mismatch" in proc.stdout


@pytest.mark.slow
def test_evaluate_refuses_a_checkpoint_that_runs_code(tmp_path):
    ckpt = tmp_path / "evil.pt"
    torch.save({"model": RunsCode(tmp_path / "pwned")}, ckpt)
    proc = run_cli("evaluate", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / 'eval'}", check=False)
    assert_refused(proc, "needs arbitrary code to load and was refused", code=2)
    assert not (tmp_path / "pwned").exists()
