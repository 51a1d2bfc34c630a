"""Where and how a model computes: the device, the precision and memory layout, the CPU
stand-in layers and compilation, and the seeding of every random-number generator."""

from __future__ import annotations

import functools
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from torch import nn

from cifar_exp import distributed
from cifar_exp.model import fast_layers
from cifar_exp.settings import PRECISIONS, TrainerSettings

log = logging.getLogger(__name__)

# cuBLAS reads its workspace setting once, when CUDA first uses it; deterministic matrix
# products need this one. Set on import, before anything touches CUDA, so that a deterministic
# job after a non-deterministic one in the same process (a sweep) is deterministic too.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

NVIDIA_DRIVER = Path("/proc/driver/nvidia/version")  # there when an NVIDIA driver is loaded


def unusable_gpu() -> str | None:
    """Why PyTorch cannot use the NVIDIA GPU this machine has (a driver too old for PyTorch's
    CUDA build, or a PyTorch without CUDA); None when CUDA works, when there is no NVIDIA
    driver, or when CUDA_VISIBLE_DEVICES hides the GPUs on purpose."""
    if torch.cuda.is_available() or not NVIDIA_DRIVER.is_file():
        return None
    if os.environ.get("CUDA_VISIBLE_DEVICES", "0").strip() in ("", "-1"):
        return None
    version = re.search(r"\d+\.\d+(\.\d+)?", NVIDIA_DRIVER.read_text())
    driver = f"NVIDIA driver {version.group() if version else 'of unknown version'}"
    if torch.version.cuda is None:
        return (
            f"this machine has an {driver}, but PyTorch {torch.__version__} is built without "
            "CUDA: install a CUDA build of PyTorch"
        )
    return (
        f"this machine has an {driver}, but PyTorch {torch.__version__} (built for CUDA "
        f"{torch.version.cuda}) cannot use it: update the driver, or install a PyTorch build "
        "for the CUDA version the driver supports (nvidia-smi shows it)"
    )


@functools.cache
def warn_once(message: str) -> None:
    log.warning(message)


def job_number() -> int:
    """This Hydra job's number in its multirun (hydra.job.num); 0 for a single run, or
    outside Hydra."""
    if not HydraConfig.initialized():
        return 0
    return OmegaConf.select(HydraConfig.get(), "job.num", default=0)


def device_problem(option: str, name: str) -> str | None:
    """What is wrong with the device `option`=`name` on this machine: a name PyTorch does not
    know, a GPU it lacks; None when the device is there (or `auto`)."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"{option}={name} is not a device; use auto, cpu, cuda, cuda:<n> or mps"
    gpus = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= gpus:
        return f"{option}={name}, but PyTorch sees {gpus} CUDA device(s) here; use auto or cpu"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return f"{option}={name}, but MPS is not available here; use auto or cpu"
    return None


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU (with a warning when the machine has
    a GPU that PyTorch cannot use); any other name is used as given. CUDA without a GPU number
    (`auto`, `cuda`) is GPU hydra.job.num modulo the GPU count: the jobs of a multirun that run
    at once (hydra/launcher=joblib, submitit_local) each train on their own GPU, round robin."""
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            return torch.device("mps")
        else:
            reason = unusable_gpu()
            if reason:
                warn_once(
                    f"trainer.device=auto trains on the CPU: {reason} (trainer.device=cpu: quiet)"
                )
            return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 0:
        return torch.device("cuda", job_number() % torch.cuda.device_count())
    return device


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (CUDA too); with `deterministic`, deterministic kernels
    only, else cuDNN picks the fastest convolution algorithms by timing them.

    All are set on every call: the jobs of a multirun share one process.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


@dataclass(frozen=True)
class Compute:
    """Where and how the model computes; every speed option can be switched off on its own."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    channels_last: bool = False
    compile: bool = False
    subsampled_convs: bool = False  # see fast_layers
    packed_dropout: bool = False
    compile_mode: str = "default"  # torch.compile's mode (settings.COMPILE_MODES)

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling keeps float16 gradients from underflowing; a no-op otherwise."""
        return torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type,
            dtype=self.autocast_dtype or torch.float32,
            enabled=self.autocast_dtype is not None,
        )

    def prepare(self, model: nn.Module, alone: bool = False) -> nn.Module:
        """Swap in the chosen stand-in layers and move the model to the device and layout, in
        place; returns what to call (in DDP when several processes train, unless this process
        runs it `alone`; compiled or not).

        Both share their parameters with `model`, whose state_dict stays the one to save.
        Where torch.compile cannot build kernels, the model runs uncompiled, with one warning.
        """
        fast_layers.swap_in(model, convs=self.subsampled_convs, dropout=self.packed_dropout)
        if self.device.type == "cuda":
            # The job's GPU is also CUDA's current device: what the process allocates without
            # naming a device (kernels' workspaces, compiled graphs) goes there, not to GPU 0.
            torch.cuda.set_device(self.device)
        model.to(self.device, memory_format=self.memory_format)
        forward = model if alone else distributed.wrap(model, self.device)
        if not self.compile:
            return forward
        failure = compile_failure(self.device.type)
        if failure:
            warn_once(
                f"trainer.compile: torch.compile cannot build kernels here ({failure}); "
                "training uncompiled. Install a C++ compiler and the Python headers "
                "(python3-dev), or set trainer.compile=false"
            )
            return forward
        # Each job starts Dynamo afresh: the jobs of a sweep share one process, and past
        # Dynamo's recompile limit (8) later jobs ran uncompiled, with only a log line.
        torch.compiler.reset()
        return torch.compile(forward, mode=self.compile_mode)

    def batch(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, in the model's layout (no copy when it already is)."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)


@functools.cache
def compile_failure(device_type: str) -> str | None:
    """Why torch.compile cannot build kernels for this kind of device here (no C++ compiler,
    no Python headers, no Triton), or None: a tiny function compiles, forward and backward.
    Asked once a process."""
    probe = torch.compile(lambda x: (x * 2).sin().sum())
    try:
        probe(torch.ones(4, device=device_type, requires_grad=True)).backward()
    except Exception as err:  # noqa: BLE001 - the compiler stack raises many types
        lines = str(err).strip().splitlines()
        return lines[0] if lines else type(err).__name__
    return None


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 that runs at speed: GPUs of compute capability 8.0 or newer (Ampere on; older
    ones emulate it, slowly), CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_compute(device: torch.device, trainer: TrainerSettings) -> Compute:
    """The speed options of the trainer settings for `device`, "auto" taking the measured
    default.

    precision auto: bf16 autocast where the device runs bf16 natively, else fp32.
    compile auto: on for CUDA; off elsewhere (on the CPU it did not pay back its compile time,
    see docs/benchmarks/log.md).
    subsampled_convs and packed_dropout auto: on for the CPU, the only device measured.
    """
    precision = trainer.precision
    if precision == "auto":
        precision = "bf16" if bf16_supported(device) else "fp32"

    def choice(value: bool | str, auto: bool) -> bool:
        return auto if value == "auto" else bool(value)

    on_cpu = device.type == "cpu"
    return Compute(
        device,
        PRECISIONS[precision],
        channels_last=trainer.channels_last,
        compile=choice(trainer.compile, device.type == "cuda"),
        subsampled_convs=choice(trainer.subsampled_convs, on_cpu),
        packed_dropout=choice(trainer.packed_dropout, on_cpu),
        compile_mode=trainer.compile_mode,
    )
