"""Stand-ins for two layers that PyTorch runs slowly on the CPU, and `swap_in`, which puts them
into a built model (the way `SyncBatchNorm.convert_sync_batchnorm` swaps BatchNorm layers).

Both keep the parameters, so state_dicts and checkpoints do not change:
- SubsampledConv2d computes a convolution whose stride equals its dilation (the seed's
  transitions) as a plain convolution over the input's subsampled grid: the same numbers,
  without oneDNN's slow weight gradient for dilated convolutions.
- PackedDropout cuts its masks from 64-bit random words, four draws per word: PyTorch's CPU
  dropout draws one random number per element, the largest cost of the seed network's step.
docs/benchmarks/log.md measures each (`python -m cifar_exp.bench`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SubsampledConv2d(nn.Conv2d):
    """nn.Conv2d with stride == dilation, computed on the subsampled grid.

    With stride s equal to dilation s, every tap reads an input pixel at r + s*k, r being the
    first one the padding lets it reach, so the convolution is a stride-1, undilated one over
    x[..., r::s, r::s], padded by the taps that fall outside.
    """

    def forward(self, x: Tensor) -> Tensor:
        (top_offset, top, bottom), (left_offset, left, right) = (
            grid_geometry(*axis)
            for axis in zip(x.shape[-2:], self.kernel_size, self.stride, self.padding, strict=True)
        )
        step_h, step_w = self.stride
        x = Subsample.apply(
            x, (..., slice(top_offset, None, step_h), slice(left_offset, None, step_w))
        )
        if top == bottom >= 0 and left == right >= 0:
            return F.conv2d(x, self.weight, self.bias, padding=(top, left), groups=self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return F.conv2d(x, self.weight, self.bias, groups=self.groups)


def grid_geometry(size: int, kernel: int, step: int, padding: int) -> tuple[int, int, int]:
    """Along one axis of a convolution with stride == dilation == step: the first input pixel
    its taps read, and the zero padding before and after the subsampled grid that gives the
    same outputs (negative after: crop)."""
    offset = -padding % step
    before = (padding + offset) // step
    grid_size = -(-(size - offset) // step)
    outputs = (size + 2 * padding - step * (kernel - 1) - 1) // step + 1
    return offset, before, outputs + kernel - 1 - before - grid_size


class Subsample(torch.autograd.Function):
    """x[index], copied in x's memory layout, with a gradient in that layout too: slicing's own
    gradient comes back NCHW, which sent the BatchNorm below a channels_last transition down a
    mixed-layout kernel ten times slower (docs/benchmarks/log.md)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, index: tuple) -> Tensor:
        ctx.index, ctx.shape = index, x.shape
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        ctx.layout = torch.channels_last if channels_last else torch.contiguous_format
        return x[index].contiguous(memory_format=ctx.layout)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        grad_x = torch.empty(
            ctx.shape, dtype=grad.dtype, device=grad.device, memory_format=ctx.layout
        )
        grad_x.zero_()[ctx.index] = grad
        return grad_x, None


class PackedDropout(nn.Dropout):
    """nn.Dropout whose mask takes four 16-bit draws from each 64-bit random word.

    A draw is kept when it is at least a threshold, so the drop rate is `p` rounded to a
    multiple of 1/65536. The mask is laid out in the input's memory order.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64, device=x.device)
        draws = words.random_(-(2**63), None).view(torch.int16)[: x.numel()]
        keep = draws >= round(self.p * 65536) - 32768
        mask = in_memory_order_of(x, keep).to(x.dtype).mul_(1 / (1 - self.p))
        return x * mask


def in_memory_order_of(x: Tensor, flat: Tensor) -> Tensor:
    """`flat` with x's shape and x's memory order (channels_last included), so that an
    elementwise op of the two reads both in one sweep."""
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    return flat.view([x.shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])


def swap_in(model: nn.Module, *, convs: bool, dropout: bool) -> nn.Module:
    """Turn, in place, each convolution with stride == dilation > 1 (convs) and each dropout
    with 0 < p < 1 (dropout) into its stand-in above.

    The stand-ins subclass the originals and change only `forward`, so switching a module's
    class keeps its parameters, buffers and hooks.
    """
    for module in model.modules():
        if convs and type(module) is nn.Conv2d and subsamples(module):
            module.__class__ = SubsampledConv2d
        elif dropout and type(module) is nn.Dropout and 0 < module.p < 1:
            module.__class__ = PackedDropout
    return model


def subsamples(conv: nn.Conv2d) -> bool:
    """Whether the convolution reads only a subsampled grid: stride == dilation > 1, zero
    padding given as numbers."""
    return (
        conv.stride == conv.dilation
        and max(conv.stride) > 1
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )
