"""Residual blocks and groups in the block list: parameters, shapes, receptive field, every norm
and transition, the CPU stand-ins, the budget guard and the small_best preset."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchinfo
from conftest import compose_train, data_overrides, run_cli
from hydra.utils import instantiate
from test_variants import IMAGE, NORMS, TRANSITIONS, conv, depthwise, norm

from cifar_exp.engine import preflight
from cifar_exp.model import budget
from cifar_exp.model.convnet import ConvNet, Residual
from cifar_exp.model.fast_layers import SubsampledConv2d, swap_in


def projection(cin: int, cout: int) -> int:
    """A shortcut's 1x1 convolution (no bias: a norm follows)."""
    return cin * cout


# Every kind of skip: an identity group, a whole block whose transition (stride 2, dilation 2,
# padding 1: 32 -> 15) changes the map, a group that widens (1x1 projection, no stride) after
# a convolution with a max-pool inside it, and global max pooling.
BLOCKS = [
    {"convs": [16]},
    {"convs": [{"residual": [16, 16]}]},
    {"convs": [32, 32], "transition": {"channels": 32, "type": "dilated"}, "residual": True},
    {"convs": [{"channels": 48, "pool": 2},
               {"residual": [48, {"channels": 64, "separable": True}]}]},
]  # fmt: skip

# By hand, in the order torchinfo lists the leaf layers (a Residual: its body, then its
# shortcut): (layer, parameters, output channels x height x width).
TABLE = [
    ("Conv2d", conv(3, 3, 16), (16, 32, 32)), ("GELU", 0, (16, 32, 32)),
    ("BatchNorm2d", norm(16), (16, 32, 32)),
    # block 1: identity skip
    ("Conv2d", conv(3, 16, 16), (16, 32, 32)), ("GELU", 0, (16, 32, 32)),
    ("BatchNorm2d", norm(16), (16, 32, 32)),
    ("Conv2d", conv(3, 16, 16), (16, 32, 32)), ("GELU", 0, (16, 32, 32)),
    ("BatchNorm2d", norm(16), (16, 32, 32)), ("Identity", 0, (16, 32, 32)),
    # block 2: (32 + 2 - 2 * 2 - 1) // 2 + 1 = 15; the skip reads pixels 1, 3, ..., 29
    ("Conv2d", conv(3, 16, 32), (32, 32, 32)), ("GELU", 0, (32, 32, 32)),
    ("BatchNorm2d", norm(32), (32, 32, 32)),
    ("Conv2d", conv(3, 32, 32), (32, 32, 32)), ("GELU", 0, (32, 32, 32)),
    ("BatchNorm2d", norm(32), (32, 32, 32)),
    ("Conv2d", conv(3, 32, 32), (32, 15, 15)),
    ("Conv2d", projection(16, 32), (32, 16, 16)),  # 31 pixels from 1 on, every 2nd: 16, cut to 15
    ("BatchNorm2d", norm(32), (32, 16, 16)),
    # block 3: 15 -> 7 by the max-pool, then a widening group
    ("Conv2d", conv(3, 32, 48), (48, 15, 15)), ("MaxPool2d", 0, (48, 7, 7)),
    ("GELU", 0, (48, 7, 7)), ("BatchNorm2d", norm(48), (48, 7, 7)),
    ("Conv2d", conv(3, 48, 48), (48, 7, 7)), ("GELU", 0, (48, 7, 7)),
    ("BatchNorm2d", norm(48), (48, 7, 7)),
    ("Conv2d", depthwise(48), (48, 7, 7)), ("Conv2d", conv(1, 48, 64), (64, 7, 7)),
    ("GELU", 0, (64, 7, 7)), ("BatchNorm2d", norm(64), (64, 7, 7)),
    ("Conv2d", projection(48, 64), (64, 7, 7)), ("BatchNorm2d", norm(64), (64, 7, 7)),
    ("AdaptiveMaxPool2d", 0, (64, 1, 1)),
    ("Conv2d", conv(1, 64, 10), (10, 1, 1)),
]  # fmt: skip

# Receptive field by hand along the deepest path (the skips' 1x1s see less): each layer adds
# (effective kernel - 1) * jump. Rows: (layer, effective kernel, stride, field after it).
RF = [
    ("b0 conv 3x3", 3, 1, 3), ("b1 conv 3x3", 3, 1, 5), ("b1 conv 3x3", 3, 1, 7),
    ("b2 conv 3x3", 3, 1, 9), ("b2 conv 3x3", 3, 1, 11),
    ("b2 dilated 3x3 s2", 5, 2, 15),                                # jump 1 -> 2
    ("b3 conv 3x3", 3, 1, 19), ("b3 maxpool 2x2", 2, 2, 21),        # jump 2 -> 4
    ("b3 conv 3x3", 3, 1, 29), ("b3 depthwise 3x3", 3, 1, 37), ("b3 pointwise 1x1", 1, 1, 37),
]  # fmt: skip


def network(blocks: list[dict] = BLOCKS, **options) -> ConvNet:
    return ConvNet(blocks, activation="gelu", global_pool="max", **options)


def is_group(spec) -> bool:
    return isinstance(spec, dict) and "residual" in spec


def without_skips(blocks: list[dict]) -> list[dict]:
    """The same layers with every residual group flattened and every block's skip removed."""

    def flat(specs):
        return [e for s in specs for e in (flat(s["residual"]) if is_group(s) else [s])]

    return [{**{k: v for k, v in b.items() if k != "residual"}, "convs": flat(b["convs"])}
            for b in blocks]  # fmt: skip


def test_parameters_and_output_shapes_match_the_hand_table():
    info = torchinfo.summary(network(), input_size=(1, *IMAGE), depth=20, verbose=0)
    rows = [
        (layer.class_name, layer.num_params, tuple(layer.output_size[1:]))
        for layer in info.summary_list
        if not layer.children
    ]
    assert rows == TABLE
    assert budget.count_parameters(network()) == sum(params for _, params, _ in TABLE)


def test_skips_are_identities_only_where_nothing_changes():
    residuals = [m for m in network().modules() if isinstance(m, Residual)]
    shortcuts = [type(m.shortcut).__name__ for m in residuals]
    assert shortcuts == ["Identity", "Sequential", "Sequential"]
    # the dilated window is centred on pixel 1
    assert [m.window.offset for m in residuals] == [0, 1, 0]


def test_the_skip_reads_the_input_pixel_at_the_centre_of_each_output_window():
    # A one-channel block whose body is the dilated transition alone, its filter a single
    # centre tap and the projection the identity: the sum is twice the centre pixel.
    block = Residual(
        torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, stride=2, dilation=2, padding=1, bias=False)),
        1, 2, torch.nn.Identity,
    )  # fmt: skip
    with torch.no_grad():
        block.body[0].weight.zero_()[0, 0, 1, 1] = 1
        block.shortcut[0].weight.fill_(1)
    x = torch.arange(16.0 * 16).view(1, 1, 16, 16)
    out = block(x)
    assert out.shape == (1, 2, 7, 7)
    torch.testing.assert_close(out[0, 0], 2 * x[0, 0, 1:15:2, 1:15:2])


def test_receptive_field_follows_the_deepest_path_and_a_skip_never_shrinks_it():
    field, jump = 1, 1
    for name, kernel, stride, after in RF:  # the hand table's own arithmetic
        field += (kernel - 1) * jump
        jump *= stride
        assert field == after, name
    assert budget.receptive_field(network(), IMAGE) == RF[-1][3]
    assert budget.receptive_field(ConvNet(without_skips(BLOCKS)), IMAGE) == RF[-1][3]
    # A skip around a stride-2 block: walking every layer in a row would count its 1x1 stride
    # twice; the field must stay that of the plain block.
    for plain in (
        [{"convs": [16, 16], "transition": {"channels": 16, "type": "strided"}}, {"convs": [16]}],
        [{"convs": [16]}, {"convs": [16], "transition": {"channels": 32, "type": "maxpool"}}],
    ):
        skipped = [{**plain[0], "residual": True}, {**plain[1], "residual": True}]
        assert budget.receptive_field(ConvNet(skipped), IMAGE) == budget.receptive_field(
            ConvNet(plain), IMAGE
        )


@pytest.mark.parametrize("norm_name", NORMS)
@pytest.mark.parametrize("placement", ["group", "block"])
def test_forward_and_backward_through_every_norm_and_residual_placement(norm_name, placement):
    blocks = BLOCKS if placement == "group" else [
        {"convs": [16]},
        {"convs": [16, 32], "transition": {"channels": 32, "type": "strided"}, "residual": True},
        {"convs": [{"channels": 32, "separable": True}], "dropout": 0.1, "residual": True},
    ]  # fmt: skip
    norm_layer = instantiate(compose_train(f"model/norm={norm_name}").model.norm)
    model = network(blocks, norm=norm_layer)
    x, y = torch.randn(4, *IMAGE), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("transition", [*TRANSITIONS, "conv"])
def test_a_residual_block_lines_up_with_every_transition(transition):
    blocks = [{"convs": [16]}, {"convs": [16], "transition": {"channels": 32}, "residual": True}]
    model = ConvNet(blocks, transition={"type": transition})
    plain = ConvNet(without_skips(blocks), transition={"type": transition})
    body_out, sum_out = [], []
    model.features[1].body.register_forward_hook(lambda m, i, o: body_out.append(o.shape))
    model.features[1].register_forward_hook(lambda m, i, o: sum_out.append(o.shape))
    model(torch.randn(2, *IMAGE)).sum().backward()
    assert body_out == sum_out
    assert budget.receptive_field(model, IMAGE) == budget.receptive_field(plain, IMAGE)


def test_a_skip_that_cannot_line_up_is_refused():
    blocks = [{"convs": [8], "transition": {"channels": 8, "strided": {"padding": 2}},
               "residual": True}]  # fmt: skip
    with pytest.raises(ValueError, match="lower the transition's padding"):
        ConvNet(blocks, transition={"type": "strided"})


def test_cpu_stand_ins_channels_last_and_bf16_keep_the_numbers():
    torch.manual_seed(0)
    model = network(dropout=0.0).double().eval()
    x = torch.randn(2, *IMAGE, dtype=torch.double)
    before = model(x)
    swapped = swap_in(copy.deepcopy(model), convs=True, dropout=True)
    kinds = [type(m) for m in swapped.modules()]
    assert kinds.count(SubsampledConv2d) == 1  # the dilated transition, not the 1x1 skips
    torch.testing.assert_close(swapped(x), before)
    channels_last = swapped.to(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last(x.to(memory_format=torch.channels_last)), before)
    trained = network().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = swap_in(trained, convs=True, dropout=True)(torch.randn(4, *IMAGE))
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert all(p.grad is not None for p in trained.parameters())


def test_whiten_and_identity_init_find_the_first_convolution_inside_a_residual_group():
    blocks = [{"convs": [{"residual": [24, 24]}]}, {"convs": [32]}]
    model = ConvNet(blocks, whiten=True, identity_init=True)
    first = model.features[0].body[0][0]
    assert model.stem is first and not first.weight.requires_grad
    model.whiten_first_layer(torch.randn(64, *IMAGE))
    assert first.weight.abs().sum() > 0
    second = model.features[0].body[1][0]  # 24 -> 24: starts as the identity
    torch.testing.assert_close(second.weight[:, :, 1, 1], torch.eye(24))


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        ([{"convs": [{"residual": [8], "channels": 8}]}], r"unknown keys \['channels'\]"),
        ([{"convs": [8, {"residual": []}]}], "an empty residual group"),
        ([{"convs": [{"channels": 8, "pool": "2x"}]}], "pool='2x'; give the max-pool's size"),
        ([{"convs": [{"channels": 8, "pool": True}]}], "pool=True; give the max-pool's size"),
        ([{"convs": [8], "residual": "yes"}], "residual='yes'; true or false"),
    ],
)
def test_a_wrong_residual_or_pool_entry_is_refused(blocks, expected):
    with pytest.raises(ValueError, match=expected):
        ConvNet(blocks)


def test_an_unknown_global_pool_is_refused():
    with pytest.raises(ValueError, match="unknown global_pool 'mean'; choose one of avg, max"):
        ConvNet([{"convs": [8]}], global_pool="mean")


@pytest.mark.slow
def test_a_residual_network_over_budget_stops_before_loading_data(tmp_path):
    # small_best's last stage with plain 3x3 convolutions instead of separable ones
    proc = run_cli(
        "train", "experiment=small_best", "model.blocks.3.separable=false", "data.format=folder",
        "data.root=/nonexistent", "logger=none", f"hydra.run.dir={tmp_path}", check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "over budget.max_params=200,000" in output
    assert "Traceback" not in output and not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.slow
def test_small_best_composes_stays_in_budget_and_trains(cifar_root, cache_dir, tmp_path):
    cfg = compose_train("experiment=small_best")
    assert cfg.model._target_ == "cifar_exp.model.convnet.ConvNet" and cfg.trainer.epochs <= 30
    model = instantiate(cfg.model)
    assert any(isinstance(m, Residual) for m in model.modules())
    params, rf = budget.enforce(model, preflight.check(cfg).budget, IMAGE)
    assert params < 200_000 and rf >= 44
    run_cli(
        "train", "experiment=small_best", *data_overrides(cifar_root, cache_dir, 256, 128),
        "trainer.epochs=1", "logger=none", f"hydra.run.dir={tmp_path}",
    )  # fmt: skip
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["params"] == params and results["receptive_field"] == rf
    assert 0 <= results["final_test_acc"] <= 1
