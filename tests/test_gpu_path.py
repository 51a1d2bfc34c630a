"""The CUDA path, checked on the CPU: what a GPU run would do differently is stood in for by
mocks, fakes, the meta device or a count of the operations that would wait for the GPU.
`python -m cifar_exp.gpucheck` runs the same on a GPU (test_gpucheck.py)."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import CONF, CPU, MEAN, REPO, STD, compose_train, data_overrides, numbered_images
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_exp import distributed
from cifar_exp.data import datasets, loaders
from cifar_exp.data.augment import BatchAugment, Pipeline
from cifar_exp.data.loaders import Batching
from cifar_exp.engine import checkpoint, compute, preflight
from cifar_exp.engine.build import build
from cifar_exp.engine.compute import Compute, resolve_compute, resolve_device, seed_everything
from cifar_exp.engine.learner import Learner, Schedule
from cifar_exp.engine.loop import CHECK_EVERY, train_epoch
from cifar_exp.errors import UserError
from cifar_exp.model.convnet import ConvNet
from cifar_exp.settings import TrainerSettings
from cifar_exp.tools.gpucheck import count_host_syncs

# The aten operations that torch.use_deterministic_algorithms documents as raising on CUDA
# (no deterministic kernel), by the names a dispatch mode sees.
NO_DETERMINISTIC_CUDA_KERNEL = {
    "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d_backward", "avg_pool3d_backward", "fractional_max_pool2d_backward",
    "fractional_max_pool3d_backward", "max_unpool2d", "max_unpool3d",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward",
    "upsample_bicubic2d_backward", "upsample_trilinear3d_backward",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "nll_loss2d_forward", "ctc_loss", "embedding_bag", "put_", "histc", "bincount", "median",
    "grid_sampler_2d_backward",
}  # fmt: skip


class Operations(TorchDispatchMode):
    """The aten operations run inside the block, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: Counter[str] = Counter()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        self.names[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def training_step_operations(model: torch.nn.Module) -> set[str]:
    with Operations() as ops:
        loss = F.cross_entropy(
            model(torch.randn(4, 3, 32, 32)), torch.arange(4), label_smoothing=0.1
        )
        loss.backward()
    return set(ops.names)


def test_precision_auto_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda **_: True)  # counts emulation
    auto, cuda = TrainerSettings(epochs=1), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4
    assert resolve_compute(cuda, auto).autocast_dtype is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert resolve_compute(cuda, auto).autocast_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "overrides",
    [[], ["model=sep_wide"], ["model.transition.type=strided"],
     ["model.transition.type=maxpool"], ["model/norm=group"], ["model/norm=instance"]],
)  # fmt: skip
def test_no_layer_lacks_a_deterministic_cuda_backward(overrides):
    """trainer.deterministic=true on CUDA raises in any of these operations. The seed's global
    AdaptiveAvgPool2d(1) is not one: ATen computes a 1x1 adaptive pool as a mean, on every
    device (but Intel's XPU), before it reaches a device's kernel, as a dispatch mode sees
    here on the CPU; other output sizes do reach the kernel."""
    assert "_adaptive_avg_pool2d_backward" in training_step_operations(
        torch.nn.Sequential(
            torch.nn.Conv2d(3, 10, 3),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
        )
    )  # the recording sees it where it is
    model = instantiate(compose_train(*overrides).model)
    assert not training_step_operations(model) & NO_DETERMINISTIC_CUDA_KERNEL


def test_cudnn_autotunes_unless_deterministic():
    seed_everything(0, deterministic=True)
    assert not torch.backends.cudnn.benchmark and torch.are_deterministic_algorithms_enabled()
    seed_everything(0)
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.slow
def test_cublas_is_set_up_for_determinism_before_anything_uses_cuda():
    """cuBLAS reads the setting once: a deterministic job after another in one process (a
    sweep) needs it set from the start."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    script = "import os, cifar_exp.train; print(os.environ.get('CUBLAS_WORKSPACE_CONFIG'))"
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == ":4096:8", out.stderr


def test_the_jobs_of_a_multirun_take_the_gpus_in_turn(monkeypatch):
    """Three GPUs (mocked): job n of a sweep trains on GPU n mod 3 with `auto` or `cuda`, as
    each job sees its Hydra config (joblib's workers, submitit's jobs); a named GPU is kept."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    hydra_config = HydraConfig.instance()
    monkeypatch.setattr(hydra_config, "cfg", None)  # put back after the test
    assert resolve_device("auto") == torch.device("cuda", 0)  # outside Hydra
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        hydra_config.set_config(compose("train", return_hydra_config=True))
        assert resolve_device("auto") == torch.device("cuda", 0)  # a single run: no job number
        for num, gpu in [(0, 0), (1, 1), (2, 2), (3, 0), (7, 1)]:
            job = compose("train", [f"hydra.job.num={num}"], return_hydra_config=True)
            hydra_config.set_config(job)
            assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", gpu)
            assert resolve_device("cuda:2") == torch.device("cuda", 2)
            assert resolve_device("cpu") == torch.device("cpu")


def test_auto_says_so_when_the_machine_has_a_gpu_pytorch_cannot_use(monkeypatch, tmp_path, caplog):
    driver = tmp_path / "version"
    driver.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  470.256.02  Thu May 2\n")
    monkeypatch.setattr(compute, "NVIDIA_DRIVER", driver)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    compute.warn_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        assert resolve_device("auto").type == "cpu"
        assert resolve_device("auto").type == "cpu"
    (record,) = caplog.records  # once
    assert "trains on the CPU" in record.message and "NVIDIA driver 470.256.02" in record.message
    assert "update the driver" in record.message or "CUDA build" in record.message
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # hidden on purpose: no warning
    assert compute.unusable_gpu() is None
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(compute, "NVIDIA_DRIVER", tmp_path / "none")  # no NVIDIA driver
    assert compute.unusable_gpu() is None


def test_a_checkpoint_keeps_one_gpus_random_state_and_resumes_on_any_number(monkeypatch):
    """set_rng_state_all failed on a machine with fewer GPUs than the checkpoint's."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7]))
    monkeypatch.setattr(
        torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state)
    )
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", None)  # calling it would fail
    state = checkpoint.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7]))  # one state, not one per GPU
    checkpoint.set_rng_state(state)
    earlier = {**state, "cuda": [torch.tensor([1]), torch.tensor([2]), torch.tensor([3])]}
    checkpoint.set_rng_state(earlier)  # an earlier version's, from 3 GPUs: the first's
    assert [s.item() for s in restored] == [7, 1]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a CPU run: nothing to set
    checkpoint.set_rng_state(state)
    assert len(restored) == 2 and checkpoint.rng_state()["cuda"] is None


class FakeGroup:
    """Stands in for a process group of two: this process is `rank`; rank 0's broadcast
    value is `from_rank_0`. Records the order of loads and broadcasts."""

    def __init__(self, monkeypatch, rank: int, from_rank_0: object = True) -> None:
        self.events: list[str] = []
        monkeypatch.setattr(distributed, "current", lambda: distributed.Ranks(rank, 2))

        def broadcast(value):
            self.events.append(f"broadcast {value}")
            return value if rank == 0 else from_rank_0

        monkeypatch.setattr(distributed, "broadcast", broadcast)

    def load(self) -> str:
        self.events.append("load")
        return "images"


def test_rank_0_loads_first_while_the_others_wait(monkeypatch):
    rank_0 = FakeGroup(monkeypatch, rank=0)
    assert distributed.main_first(rank_0.load, "load") == "images"
    assert rank_0.events == ["load", "broadcast True"]
    rank_1 = FakeGroup(monkeypatch, rank=1)
    assert distributed.main_first(rank_1.load, "load") == "images"
    assert rank_1.events == ["broadcast None", "load"]  # waits for rank 0's word, then loads


def test_when_rank_0_cannot_load_the_others_stop_without_trying(monkeypatch, tmp_path):
    rank_0 = FakeGroup(monkeypatch, rank=0)
    with pytest.raises(ZeroDivisionError):
        distributed.main_first(lambda: 1 / 0, "load")
    assert rank_0.events == ["broadcast False"]
    rank_1 = FakeGroup(monkeypatch, rank=1, from_rank_0=False)
    with pytest.raises(UserError, match="rank 0 failed to load the train images"):
        cfg = compose_train(f"data.root={tmp_path}", "data.format=folder")
        settings = preflight.check(cfg).data
        datasets.load(settings, "train")  # through main_first: no download, no decode on rank 1
    assert rank_1.events == ["broadcast None"]


def test_the_process_group_ends_after_every_rank_is_done_not_after_an_error(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    distributed.teardown()
    assert calls == ["barrier", "destroy"]
    calls.clear()
    try:
        raise SystemExit(2)  # an error that ends the run: the other ranks may never arrive
    except SystemExit:
        distributed.teardown()
    assert calls == ["destroy"]


def lockstep_worker(rank: int, store: str, drift: bool, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # as seed_everything does on every rank
    generator = torch.Generator().manual_seed(1)
    torch.rand(3 + (rank if drift else 0), generator=generator)
    try:
        distributed.check_lockstep(generator)
        outcome = "same"
    except RuntimeError as err:
        outcome = str(err)
    with open(f"{results}.{rank}", "w") as f:
        f.write(outcome)
    dist.destroy_process_group()


@pytest.mark.parametrize("drift", [False, True])
@pytest.mark.slow
def test_ranks_that_drew_different_random_numbers_are_caught(tmp_path, drift):
    results = tmp_path / "outcome"
    mp.spawn(lockstep_worker, args=(str(tmp_path / "store"), drift, str(results)), nprocs=2)
    outcomes = {(tmp_path / f"outcome.{r}").read_text() for r in (0, 1)}
    if drift:
        assert all("drew different random numbers" in o for o in outcomes)
    else:
        assert outcomes == {"same"}


@pytest.mark.parametrize(
    ("n", "batch_size", "world_size", "shares"),
    [(19, 8, 4, [2, 2]), (22, 8, 4, [2, 2, 1]), (17, 8, 2, [4, 4])],
)
def test_every_rank_gets_an_equal_nonempty_share_of_every_batch(n, batch_size, world_size, shares):
    """A last batch of fewer images than ranks once gave a rank an empty batch: a NaN loss."""
    images = numbered_images(per_class=3)
    images = type(images)(images.images[:n], images.labels[:n], images.classes)
    for augmentation in (BatchAugment(MEAN, STD), Pipeline(MEAN, STD)):
        for rank in range(world_size):
            loader = augmentation.loader(
                images, Batching(batch_size=batch_size, shuffle=True, seed=0, device=CPU.device,
                ranks=distributed.Ranks(rank, world_size)),
            )  # fmt: skip
            assert [len(labels) for _, labels in loader] == shares and len(loader) == len(shares)


def test_the_last_batch_is_kept_filled_or_dropped():
    images = numbered_images(per_class=5)  # 50 images
    as_is = BatchAugment((0, 0, 0), (1 / 255,) * 3)

    def epoch(last_batch: str) -> list[list[int]]:
        loader = as_is.loader(
            images,
            Batching(batch_size=16, shuffle=True, seed=0, device=CPU.device, last_batch=last_batch),
        )
        return [x.flatten(1)[:, 0].round().int().tolist() for x, _ in loader]

    kept, filled, dropped = epoch("keep"), epoch("fill"), epoch("drop")
    assert [len(b) for b in kept] == [16, 16, 16, 2]
    assert [len(b) for b in filled] == [16] * 4  # one shape, as many steps
    assert filled[:3] == kept[:3] and filled[3] == kept[3] + kept[0][:14]
    assert dropped == kept[:3]
    with pytest.raises(UserError, match="data.last_batch=drop"):
        loaders.epoch_size(10, 16, "drop")


def test_compiled_training_fills_its_last_batch(cifar_root, cache_dir, monkeypatch):
    monkeypatch.setattr(compute, "compile_failure", lambda device_type: "no compiler (test)")
    for compiled, size in (("true", 128), ("false", 100)):
        cfg = compose_train(
            *data_overrides(cifar_root, cache_dir, train=100, test=100), "trainer.device=cpu",
            f"trainer.compile={compiled}", "data.batch_size=64",
        )  # fmt: skip
        built = build(cfg, preflight.check(cfg))
        assert built.loaders.train.size == size and len(built.loaders.train) == 2


def counting_compile(compiled: list) -> object:
    """torch.compile with a backend that counts the graphs it is given and runs them as is."""
    real = torch.compile

    def backend(graph: torch.fx.GraphModule, example_inputs: list) -> object:
        compiled.append(graph)
        return graph.forward

    return lambda model, mode=None: real(model, backend=backend)


def test_every_job_of_a_sweep_is_compiled(monkeypatch):
    """Without a fresh start per job, the ninth model (another dropout rate, as in a search)
    ran uncompiled: Dynamo's recompile limit is 8."""
    compiled = []
    monkeypatch.setattr(compute, "compile_failure", lambda device_type: None)
    monkeypatch.setattr(torch, "compile", counting_compile(compiled))
    for job in range(10):
        model = ConvNet([{"convs": [8], "transition": {"channels": 16}}], dropout=0.01 * (job + 1))
        forward = Compute(CPU.device, compile=True).prepare(model)
        before = len(compiled)
        forward(torch.randn(2, 3, 32, 32))
        assert len(compiled) > before, f"job {job} ran uncompiled"


def test_without_a_working_compiler_training_runs_uncompiled_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    compute.compile_failure.cache_clear()
    compute.warn_once.cache_clear()
    try:
        with caplog.at_level(logging.WARNING):
            forwards = [
                Compute(CPU.device, compile=True).prepare(ConvNet(
                    [{"convs": [8], "transition": {"channels": 16}}]
                ))
                for _ in range(2)
            ]  # fmt: skip
    finally:
        compute.compile_failure.cache_clear()  # later tests probe the real compiler
        torch.compiler.reset()
    assert all(isinstance(f, ConvNet) for f in forwards)  # the model itself, uncompiled
    assert forwards[0](torch.randn(2, 3, 32, 32)).shape == (2, 10)
    (warning,) = [r for r in caplog.records if "cannot build kernels" in r.message]
    assert "C++ compiler" in warning.message and "trainer.compile=false" in warning.message


def test_a_training_step_waits_for_the_device_only_at_the_loss_checks():
    """Nothing in a step reads a value back or copies Python data to the device: the loop
    waits every CHECK_EVERY steps, not every step. (The s9 augmentation once copied its
    mean, std and image size to the device every batch: three waits a step on a GPU.)"""
    steps = 2 * CHECK_EVERY + 5
    rng = np.random.default_rng(0)
    images = numbered_images(per_class=steps * 4 // 10 + 1)
    images = type(images)(
        rng.integers(0, 256, images.images.shape, dtype=np.uint8), images.labels, images.classes
    )
    augmentation = BatchAugment(
        MEAN, STD, flip_p=0.5, affine_p=1, translate=0.1, scale=(0.9, 1.1), rotate=10,
        cutout_p=0.5, cutout_size=8,
    )  # fmt: skip
    loader = augmentation.loader(
        images, Batching(batch_size=4, shuffle=True, seed=0, device=CPU.device)
    )
    model = ConvNet([{"convs": [8], "transition": {"channels": 16}}], dropout=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    schedule = Schedule(
        torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, total_steps=100), "step"
    )
    learner = Learner(model, model, optimizer, schedule, CPU.grad_scaler(), CPU)
    train_epoch(learner, [next(iter(loader))])  # the optimizer's state is made at its first step
    waits = count_host_syncs(lambda: train_epoch(learner, loader, label_smoothing=0.1), CPU.device)
    assert len(loader) >= steps
    # The loss checks, and the epoch's totals (the image count copied in, the sums read back).
    assert waits <= math.ceil(len(loader) / CHECK_EVERY) + 2
    assert count_host_syncs(lambda: torch.tensor(MEAN).sum().item(), CPU.device) == 2
