"""The CPU stand-ins: SubsampledConv2d gives the convolution's numbers and gradients,
PackedDropout the dropout distribution, and swap_in changes nothing a checkpoint holds."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import compose_train
from hydra.utils import instantiate
from torch import nn

from cifar_exp.model.fast_layers import PackedDropout, SubsampledConv2d, swap_in


@pytest.mark.parametrize(
    ("size", "padding", "step"),
    # even and odd sizes and paddings: symmetric padding, one-sided padding and cropping
    [(s, p, d) for s, p, d in itertools.product((7, 8, 16, 17, 32), (0, 1, 2, 3), (2, 3))],
)
def test_subsampled_conv_matches_the_dilated_strided_conv(size, padding, step):
    torch.manual_seed(size * 10 + padding)
    conv = nn.Conv2d(4, 6, 3, stride=step, dilation=step, padding=padding).double()
    fast = SubsampledConv2d(4, 6, 3, stride=step, dilation=step, padding=padding).double()
    fast.load_state_dict(conv.state_dict())
    x = torch.randn(2, 4, size, size + 1, dtype=torch.double, requires_grad=True)
    expected = conv(x)
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, conv.weight, conv.bias))
    got = fast(x)
    got_grads = torch.autograd.grad(got.square().sum(), (x, fast.weight, fast.bias))
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grads, expected_grads)


def seed_model() -> nn.Module:
    return instantiate(compose_train().model)


def test_swap_in_turns_the_seed_transitions_and_dropouts_and_keeps_the_numbers():
    torch.manual_seed(0)
    model = seed_model().double().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32, dtype=torch.double)
    before = model(x)
    swap_in(model, convs=True, dropout=True)
    kinds = [type(m) for m in model.modules()]
    # blocks 1-3 end in stride-2, dilation-2 transitions; the last one and the 3x3s don't
    assert kinds.count(SubsampledConv2d) == 3
    assert kinds.count(PackedDropout) == 8 and nn.Dropout not in kinds
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    torch.testing.assert_close(model(x), before)


def test_swap_in_leaves_what_is_switched_off():
    model = swap_in(seed_model(), convs=False, dropout=False)
    assert {SubsampledConv2d, PackedDropout}.isdisjoint(type(m) for m in model.modules())


def test_packed_dropout_drops_at_rate_p_in_every_lane_and_rescales():
    torch.manual_seed(0)
    p = 0.1
    layer = swap_in(nn.Sequential(nn.Dropout(p)), convs=False, dropout=True)[0]
    assert isinstance(layer, PackedDropout)
    x = torch.ones(1 << 22)
    y = layer(x)
    dropped = y == 0
    # each lane of the 64-bit words (positions i % 4) draws from its own 16 bits; 1.5e-3 is
    # 5 standard deviations of the rate over 2**20 draws (a lane with a fixed sign bit would
    # drop nothing or everything)
    for lane in range(4):
        assert dropped[lane::4].float().mean().item() == pytest.approx(p, abs=1.5e-3)
    assert torch.allclose(y[~dropped], torch.tensor(1 / (1 - p)))
    assert not torch.equal(layer(x), y)  # a fresh mask per call
    layer.eval()
    assert layer(x) is x


def test_packed_dropout_keeps_the_layout_and_backpropagates_its_mask():
    torch.manual_seed(0)
    layer = PackedDropout(0.5)
    x = torch.randn(8, 16, 5, 5).to(memory_format=torch.channels_last).requires_grad_()
    torch.manual_seed(1)
    y = layer(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    (grad,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(grad, (y != 0).float() * 2)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), y)  # the seed fixes the mask
