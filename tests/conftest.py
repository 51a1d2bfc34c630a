"""Shared fixtures. Tests on real images use this machine's data location (CIFAR_DATA or
conf/local/) or the CIFAR-10 copy in ../shared/data, unpacked once into the user's cache. In CI
a missing copy is a failure; elsewhere those tests are skipped with the reason."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from PIL import Image

from cifar_exp.data import datasets
from cifar_exp.data.augment import BatchAugment
from cifar_exp.data.datasets import ImageSet
from cifar_exp.data.loaders import Batching
from cifar_exp.engine.compute import Compute
from cifar_exp.engine.learner import Learner, Schedule
from cifar_exp.settings import CONF_MODULE
from cifar_exp.track.record import RunFacts, RunRecord

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# conf/data/cifar10.yaml's normalisation, for tests that build pipelines directly
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


# Fixtures that train or run a command (seconds each): a test that uses one is slow too, so
# `make test-quick` (pytest -m "not slow") never pays for them.
TRAINING_FIXTURES = {"seed_sweep", "smoke_run", "stopped_run", "runs", "sweep", "report",
                     "uninterrupted", "study_dir"}  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def cifar_root() -> Path:
    """A folder-format CIFAR-10 tree, root/{train,test}/<class>/*.jpg: this machine's data
    location (CIFAR_DATA or conf/local/, as for training) if it holds one, else the copy in
    ../shared/data; an archive is unpacked once into the user's cache and reused."""
    for source in (compose_train().data.root, ARCHIVE):
        if Path(source).expanduser().exists():
            root, fmt = datasets.locate(str(source), "auto")
            if fmt == "folder":
                return root
    reason = f"no CIFAR-10 folder tree: set CIFAR_DATA (or conf/local/), or provide {ARCHIVE}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decode cache for the whole session, so each subset is decoded once."""
    return tmp_path_factory.mktemp("decode-cache")


def hide_module(monkeypatch: pytest.MonkeyPatch, module: str) -> None:
    """Make `module` look not installed to importlib.util.find_spec (a missing extra)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == module else find_spec(name, *a),
    )


def compose_train(*overrides: str) -> DictConfig:
    """The training config with these overrides, as the command line would compose it."""
    with initialize_config_module(CONF_MODULE, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def run_cli(
    module: str, *overrides: str, check: bool = True, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m cifar_exp.<module> overrides...` as a user would, from the repo root."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", f"cifar_exp.{module}", *overrides],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def data_overrides(root: Path, cache: Path, train: int, test: int) -> list[str]:
    return [
        f"data.root={root}",
        "data.format=folder",
        f"data.cache_dir={cache}",
        f"data.limit_train={train}",
        f"data.limit_test={test}",
        "trainer.progress=false",
    ]


@pytest.fixture(scope="session")
def seed_sweep(cifar_root, cache_dir, tmp_path_factory) -> Path:
    """The README's `-m experiment=norm_comparison seed=0,1,2` at toy scale: 2 norms x 3
    seeds, 2 epochs of batches of 16 on 200 training and 100 test images each (6 runs)."""
    sweep_dir = tmp_path_factory.mktemp("seeds") / "sweep"
    run_cli(
        "train",
        "-m",
        "experiment=norm_comparison",
        "model/norm=batch,group",
        "seed=0,1,2",
        *data_overrides(cifar_root, cache_dir, train=200, test=100),
        "data.batch_size=16",  # steps enough to leave chance, and the seeds apart
        "trainer.epochs=2",
        f"hydra.sweep.dir={sweep_dir}",
    )
    return sweep_dir


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def section_rows(report_md: str, heading: str) -> list[list[str]]:
    """The data rows of the first markdown table after `heading` (cifar-report's report.md)."""
    after = report_md.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(after) if line.startswith("|---"))
    rows = itertools.takewhile(lambda line: line.startswith("|"), after[start + 1 :])
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in rows]


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's offline .wandb logs (one per session: a resumed run has
    several), oldest first, read back with `wandb leet inspect`."""
    records = []
    for log_file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run(
            [
                str(Path(sys.executable).parent / "wandb"),
                "leet",
                "inspect",
                "--json",
                str(log_file),
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        ).stdout
        records += [json.loads(line) for line in out.splitlines() if line.strip()]
    return records


def augment_batch(augmentation, images: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Any augmentation applied to uint8 NHWC images through its own loader, in order: a
    float NCHW batch."""
    image_set = ImageSet(images, np.zeros(len(images), dtype=np.int64), ("only",))
    loader = augmentation.loader(
        image_set, Batching(batch_size=len(images), shuffle=False, seed=seed, device=CPU.device)
    )
    (batch, _), *_ = loader
    return batch


def write_tree(root: Path, classes: dict[str, list[str]], per_class: int = 3) -> Path:
    """root/{train,test}/<class>/<nnnn>.png with random pixels, the classes of each split."""
    rng = np.random.default_rng(0)
    for split, names in classes.items():
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i:04d}.png")
    return root


def numbered_images(per_class: int = 20, classes: int = 10) -> ImageSet:
    """per_class images of each class, class by class, every pixel of image i equal to i."""
    labels = np.repeat(np.arange(classes), per_class)
    images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones(
        (1, 32, 32, 3), dtype=np.uint8
    )
    return ImageSet(images, labels, tuple(f"c{i}" for i in range(classes)))


# The training loop's parts at toy scale, on the CPU.
CPU = Compute(torch.device("cpu"))
TINY_BLOCKS = [{"convs": [8], "transition": {"channels": 16, "type": "strided"}}]


class RecordingTracker:
    """Stands in for the W&B run (checked end to end in test_train.py)."""

    id = "recording"

    def __init__(self):
        self.logged = []
        self.summary = {}
        self.tags = []

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def add_tags(self, *tags):
        self.tags += tags


def random_loader(n: int = 64, batch_size: int = 16, seed: int = 0):
    """n random uint8 images (labels 0..9 in turn), normalised only, in a fixed order."""
    rng = np.random.default_rng(seed)
    images = ImageSet(
        rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        np.arange(n) % 10,
        tuple("abcdefghij"),
    )
    return BatchAugment(MEAN, STD).loader(
        images, Batching(batch_size=batch_size, shuffle=False, seed=seed, device=CPU.device)
    )


def make_learner(model, scheduler_factory=None, interval="epoch", monitor=None, lr=0.1):
    """The model with SGD and the scheduler `scheduler_factory(optimizer)` makes (StepLR(5)
    if none), on the CPU in float32."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    make = scheduler_factory or (lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5))
    schedule = Schedule(make(optimizer), interval, monitor)
    return Learner(model, model, optimizer, schedule, CPU.grad_scaler(), CPU)


def make_record(run_dir: Path, tracker=None, monitor="test_acc", epochs=2) -> RunRecord:
    facts = RunFacts(monitor=monitor, optimized_metric=monitor, epochs=epochs, config={})
    return RunRecord(run_dir, facts, tracker or RecordingTracker())
