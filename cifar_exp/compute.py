"""Where and how a model computes: the device, the precision and memory layout, the CPU
stand-in layers and compilation, and the seeding of every random-number generator."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from cifar_exp import distributed, fast_layers

if TYPE_CHECKING:
    from cifar_exp.validation import Trainer


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; any other name is used as given."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and PyTorch (CUDA too); optionally allow deterministic kernels only.

    Both are set on every call: the jobs of a multirun share one process.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = False


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Compute:
    """Where and how the model computes; every speed option can be switched off on its own."""

    device: torch.device
    autocast_dtype: torch.dtype | None = None  # None: plain float32
    channels_last: bool = False
    compile: bool = False
    subsampled_convs: bool = False  # see fast_layers
    packed_dropout: bool = False

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

    def prepare(self, model: nn.Module) -> nn.Module:
        """Swap in the chosen stand-in layers and move the model to the device and layout, in
        place; returns what to call (in DDP when several processes train, compiled or not).

        Both share their parameters with `model`, whose state_dict stays the one to save.
        """
        fast_layers.swap_in(model, convs=self.subsampled_convs, dropout=self.packed_dropout)
        model.to(self.device, memory_format=self.memory_format)
        forward = distributed.wrap(model, self.device)
        return torch.compile(forward) if self.compile else forward

    def batch(
        self, images: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the device, in the model's layout (no copy when it already is)."""
        images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 that runs at speed: Ampere or newer GPUs, CPUs with AVX512-BF16 or AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_compute(device: torch.device, trainer: Trainer) -> Compute:
    """The speed options of the trainer settings for `device`, "auto" taking the measured
    default.

    precision auto: bf16 autocast where the device runs bf16 natively, else fp32.
    compile auto: on for CUDA; off elsewhere (on the CPU it did not pay back its compile time,
    see BENCHMARKS.md).
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
    )
