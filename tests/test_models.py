"""The seed network matches the seed's layer table exactly."""

from __future__ import annotations

import pytest
import torch
import torchinfo
from conftest import compose_train
from hydra.utils import instantiate

from cifar_exp.model import budget
from cifar_exp.model.convnet import ConvNet

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
    return instantiate(compose_train("model=s9").model)


def leaf_layers(model: torch.nn.Module) -> list[torchinfo.layer_info.LayerInfo]:
    info = torchinfo.summary(model, input_size=(1, 3, 32, 32), depth=10, verbose=0)
    return [layer for layer in info.summary_list if not layer.children]


def test_seed_parameter_count(seed_net):
    # The default s9 freezes its first layer's filters at a whitening (model.whiten): 32 of
    # 3x3x3, still counted; without it every parameter trains, as in the seed.
    assert budget.count_parameters(seed_net) == 180_298
    frozen = 32 * 3 * 3 * 3
    assert sum(p.numel() for p in seed_net.parameters() if p.requires_grad) == 180_298 - frozen
    trained = instantiate(compose_train("model=s9", "model.whiten=false").model)
    assert sum(p.numel() for p in trained.parameters() if p.requires_grad) == 180_298


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


def test_zero_dropout_leaves_the_module_out():
    blocks = [{"convs": [8], "transition": {"channels": 8}}]
    assert not any(isinstance(m, torch.nn.Dropout) for m in ConvNet(blocks).modules())
