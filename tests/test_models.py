"""The seed network matches the seed's layer table exactly."""

from __future__ import annotations

import pytest
import torch
import torchinfo
from conftest import REPO
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_exp.models import NORMS, ConvNet

# (layer type, output shape without the batch) of every row of ../shared/seed/README.md's table.
SEED_TABLE = [
    ("Conv2d", (32, 32, 32)), ("ReLU", (32, 32, 32)), ("BatchNorm2d", (32, 32, 32)),
    ("Dropout", (32, 32, 32)),
    ("Conv2d", (64, 32, 32)), ("ReLU", (64, 32, 32)), ("BatchNorm2d", (64, 32, 32)),
    ("Dropout", (64, 32, 32)),
    ("Conv2d", (32, 16, 16)),
    ("Conv2d", (32, 16, 16)), ("ReLU", (32, 16, 16)), ("BatchNorm2d", (32, 16, 16)),
    ("Dropout", (32, 16, 16)),
    ("Conv2d", (64, 16, 16)), ("ReLU", (64, 16, 16)), ("BatchNorm2d", (64, 16, 16)),
    ("Dropout", (64, 16, 16)),
    ("Conv2d", (32, 7, 7)),
    ("Conv2d", (32, 7, 7)), ("ReLU", (32, 7, 7)), ("BatchNorm2d", (32, 7, 7)),
    ("Dropout", (32, 7, 7)),
    ("Conv2d", (32, 7, 7)), ("Conv2d", (64, 7, 7)), ("ReLU", (64, 7, 7)),
    ("BatchNorm2d", (64, 7, 7)), ("Dropout", (64, 7, 7)),
    ("Conv2d", (32, 3, 3)),
    ("Conv2d", (32, 3, 3)), ("ReLU", (32, 3, 3)), ("BatchNorm2d", (32, 3, 3)),
    ("Dropout", (32, 3, 3)),
    ("Conv2d", (64, 3, 3)), ("ReLU", (64, 3, 3)), ("BatchNorm2d", (64, 3, 3)),
    ("Dropout", (64, 3, 3)),
    ("Conv2d", (64, 3, 3)),
    ("AdaptiveAvgPool2d", (64, 1, 1)),
    ("Conv2d", (10, 1, 1)),
]  # fmt: skip

# Parameters per Conv2d row of the seed table, in order.
SEED_CONV_PARAMS = [
    896, 18496, 18464, 9248, 18496, 18464, 9248, 320, 2112, 18464, 9248, 18496, 36928, 650,
]  # fmt: skip


@pytest.fixture
def seed_net() -> ConvNet:
    return instantiate(OmegaConf.load(REPO / "conf" / "model" / "s9.yaml"))


def leaf_layers(model: torch.nn.Module) -> list[torchinfo.layer_info.LayerInfo]:
    info = torchinfo.summary(model, input_size=(1, 3, 32, 32), depth=10, verbose=0)
    return [layer for layer in info.summary_list if not layer.children]


def test_seed_parameter_count(seed_net):
    assert sum(p.numel() for p in seed_net.parameters() if p.requires_grad) == 180_298


def test_seed_layer_types_and_output_shapes_match_the_table(seed_net):
    rows = [(layer.class_name, tuple(layer.output_size[1:])) for layer in leaf_layers(seed_net)]
    assert rows == SEED_TABLE


def test_seed_conv_parameters_match_the_table(seed_net):
    convs = [layer.num_params for layer in leaf_layers(seed_net) if layer.class_name == "Conv2d"]
    assert convs == SEED_CONV_PARAMS


def test_seed_transitions_are_strided_and_dilated(seed_net):
    transitions = [
        m for m in seed_net.features if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)
    ]
    assert len(transitions) == 3
    assert all(m.dilation == (2, 2) for m in transitions)
    depthwise = [m for m in seed_net.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 1 and depthwise[0].groups == depthwise[0].in_channels == 32


@pytest.mark.parametrize("norm", NORMS)
def test_every_norm_trains_a_step(norm):
    blocks = [{"convs": [8, 16], "transition": {"channels": 8, "stride": 2, "padding": 1}}]
    model = ConvNet(blocks, norm=norm, norm_groups=4, dropout=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_zero_dropout_leaves_the_module_out():
    blocks = [{"convs": [8], "transition": {"channels": 8}}]
    assert not any(isinstance(m, torch.nn.Dropout) for m in ConvNet(blocks).modules())


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        ConvNet([{"convs": [8], "transition": {"channels": 8}}], norm="batchnorm")
