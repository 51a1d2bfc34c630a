"""What a run survives besides a kill (tests/test_faults.py): a real full disk, a resume that
would change its meaning, the gates of evaluate and report, and data folders as users make
them."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import data_overrides, read_metrics, run_cli, write_tree
from PIL import Image

from cifar_exp.data import datasets
from cifar_exp.errors import UserError


def refused(proc, expected: str) -> None:
    """Exit 2 with one error line that says `expected`, and no traceback."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    errors = [line for line in output.splitlines() if "ERROR" in line or expected in line]
    assert len(errors) == 1 and expected in errors[0], output
    assert "Traceback" not in output, output


@pytest.fixture(scope="module")
def small_run(cifar_root, cache_dir, tmp_path_factory) -> Path:
    """One finished epoch on 200 images (BatchNorm, the default)."""
    run_dir = tmp_path_factory.mktemp("small") / "run"
    run_cli("train", *data_overrides(cifar_root, cache_dir, train=200, test=100),
            "trainer.epochs=1", "logger=none", f"hydra.run.dir={run_dir}")  # fmt: skip
    return run_dir


@pytest.mark.slow
def test_resume_refuses_another_option_of_a_config_group(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    proc = run_cli("train", f"trainer.resume={copy}", "model/norm=group", check=False)
    refused(proc, "changes model/norm (saved: batch, given: group); drop model/norm=group")
    assert run_cli("train", f"trainer.resume={copy}", "model/norm=batch").returncode == 0


@pytest.mark.slow
def test_resume_refuses_data_with_other_classes(small_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    other = write_tree(tmp_path / "data", {s: [f"class{i}" for i in range(10)]
                                           for s in ("train", "test")})  # fmt: skip
    proc = run_cli("train", f"trainer.resume={copy}", f"data.root={other}", check=False)
    refused(proc, f"differ from those trainer.resume={copy / 'checkpoints' / 'last.pt'} was "
            "trained on (airplane, automobile, bird")  # fmt: skip
    assert "the data's classes (class0, class1, class2" in proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_evaluate_and_report_refuse_a_missing_gpu(command, small_run):
    args = {
        "evaluate": [f"ckpt={small_run / 'checkpoints' / 'best.pt'}", "device=cuda:0",
                     "logger=none"],
        "report": [str(small_run), "--device", "cuda:0"],
    }[command]  # fmt: skip
    proc = run_cli(command, *args, check=False)
    option = {"evaluate": "device", "report": "--device"}[command]
    refused(proc, f"{option}=cuda:0, but PyTorch sees 0 CUDA device(s) here; use auto or cpu")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["evaluate", "report"])
def test_evaluate_and_report_refuse_an_unwritable_folder(command, small_run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    args = {
        "evaluate": [f"ckpt={small_run / 'checkpoints' / 'best.pt'}", "logger=none",
                     f"hydra.run.dir={blocker / 'eval'}"],
        "report": [str(small_run), "--out", str(blocker / "report")],
    }[command]  # fmt: skip
    proc = run_cli(command, *args, check=False)
    refused(
        proc, f"cannot write the folder {blocker / ('eval' if command == 'evaluate' else 'report')}"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB file system (tmpfs): room for one checkpoint of the seed network and its
    temporary copy, not for two checkpoints and a copy."""
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_called_a_full_disk_and_the_run_resumes_once_there_is_room(
    small_disk, cifar_root, cache_dir
):
    run_dir = small_disk / "run"
    overrides = [*data_overrides(cifar_root, cache_dir, train=200, test=100),
                 "trainer.epochs=2", "logger=none", f"hydra.run.dir={run_dir}"]  # fmt: skip
    proc = run_cli("train", *overrides, check=False)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"no space left on the device to write {run_dir / 'checkpoints'}" in output
    assert "the disk is full" in output and "Traceback" not in output
    assert not list(run_dir.rglob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=20m", str(small_disk)], check=True)
    run_cli("train", *overrides, f"trainer.resume={run_dir}")
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]


def test_images_of_another_size_are_named_with_the_file(tmp_path):
    root = write_tree(tmp_path, {"train": ["cat", "dog"]})
    odd = root / "train" / "dog" / "0001.png"
    Image.new("RGB", (40, 30)).save(odd)
    with pytest.raises(UserError, match=f"image {odd} is 40x30 pixels, but the other images are "
                       "32x32 \\(in all, 1 of another size\\)"):  # fmt: skip
        datasets.load_folder(root, "train", None, None)


def test_grey_and_rgba_images_hidden_folders_and_stray_files_are_handled(tmp_path):
    root = write_tree(tmp_path, {"train": ["cat", "dog"]})
    Image.new("L", (32, 32), 7).save(root / "train" / "cat" / "grey.png")
    Image.new("RGBA", (32, 32), (1, 2, 3, 4)).save(root / "train" / "dog" / "alpha.png")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a notebook's, not a class
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    (root / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    images = datasets.load_folder(root, "train", None, None)
    assert images.classes == ("cat", "dog")
    assert images.images.shape == (8, 32, 32, 3) and images.labels.tolist() == [0] * 4 + [1] * 4
    assert (images.images[3] == 7).all()  # grey.png, sorted after 0000-0002.png


def test_a_damaged_or_unwritable_cache_is_rebuilt_or_skipped_with_a_warning(tmp_path, caplog):
    root = write_tree(tmp_path / "data", {"train": ["cat", "dog"]})
    cache = tmp_path / "cache"
    first = datasets.load_folder(root, "train", None, cache)
    (cache_file,) = cache.glob("*.npy")
    cache_file.write_bytes(cache_file.read_bytes()[:100])  # cut short
    again = datasets.load_folder(root, "train", None, cache)
    assert np.array_equal(again.images, first.images)
    assert f"The decoded-image cache {cache_file} is damaged" in caplog.text
    assert np.array_equal(np.load(cache_file), first.images)  # written again, whole
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    third = datasets.load_folder(root, "train", None, blocked / "cache")
    assert np.array_equal(third.images, first.images)
    assert "The decoded images are not cached: cannot write" in caplog.text
    assert not list(tmp_path.rglob("*.tmp"))


@pytest.mark.slow
def test_report_over_every_folder_reports_the_finished_runs_and_lists_the_failed(
    small_run, tmp_path
):
    """`cifar-report outputs/*/*` where outputs holds a finished run, a run refused at its
    start and an evaluation."""
    shutil.copytree(small_run, tmp_path / "finished")
    failed = run_cli("train", "data.root=/nonexistent", "data.format=folder",
                     f"hydra.run.dir={tmp_path / 'failed'}", check=False)  # fmt: skip
    assert failed.returncode == 2
    run_cli("evaluate", f"ckpt={small_run / 'checkpoints' / 'best.pt'}", "logger=none",
            f"hydra.run.dir={tmp_path / 'eval'}")  # fmt: skip
    proc = run_cli("report", *map(str, sorted(tmp_path.iterdir())), "--images", "0",
                   "--out", str(tmp_path / "report"))  # fmt: skip
    output = proc.stdout + proc.stderr
    assert f"{tmp_path / 'failed'} (failed, No data set at data.root=/nonexistent" in output
    text = (tmp_path / "report" / "report.md").read_text()
    assert text.count("| [") == 1 and "](../finished)" in text
    assert str(tmp_path / "eval") in output  # listed: it holds no run
