"""Model variants from YAML: parameters, receptive field, shapes, training step, budget guard."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import CONF, compose_train, run_cli
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from cifar_exp.engine import preflight
from cifar_exp.model import budget

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
NORMS = sorted(p.stem for p in (CONF / "model" / "norm").glob("*.yaml"))
TRANSITIONS = ["dilated", "strided", "maxpool", "dilated_nostride"]


IMAGE = (3, 32, 32)


def build(*overrides: str) -> torch.nn.Module:
    """The network as a Hydra user builds it: instantiate(cfg.model), nothing else."""
    return instantiate(compose_train(*overrides).model)


def conv(k: int, cin: int, cout: int) -> int:
    """Parameters of a k x k convolution with bias."""
    return k * k * cin * cout + cout


def depthwise(c: int) -> int:
    return conv(3, 1, 1) * c


def norm(c: int) -> int:
    return 2 * c  # scale and shift per channel


# sep_wide's parameters counted by hand from conf/model/sep_wide.yaml, layer by layer.
SEP_WIDE_PARAMS = sum([
    conv(3, 3, 32), norm(32), conv(3, 32, 64), norm(64), conv(1, 64, 64),          # block 1
    depthwise(64), conv(1, 64, 96), norm(96), depthwise(96), conv(1, 96, 128), norm(128),
    conv(1, 128, 96),                                                                # block 2
    depthwise(96), conv(1, 96, 128), norm(128), depthwise(128), conv(1, 128, 160), norm(160),
    conv(1, 160, 128),                                                               # block 3
    depthwise(128), conv(1, 128, 160), norm(160), depthwise(160), conv(1, 160, 192), norm(192),
    conv(1, 192, 128),                                                               # block 4
    conv(1, 128, 10),                                                                # classifier
])  # fmt: skip

# Receptive field by hand: each layer adds (effective kernel - 1) * jump, where the jump is the
# product of the strides before it and a dilated 3x3 has effective kernel 5.
# Rows: (layer, effective kernel, stride, receptive field after it).
SEED_RF = [
    ("b1 conv 3x3", 3, 1, 3), ("b1 conv 3x3", 3, 1, 5),
    ("b1 dilated 3x3 s2", 5, 2, 9),                      # jump 1 -> 2
    ("b2 conv 3x3", 3, 1, 13), ("b2 conv 3x3", 3, 1, 17),
    ("b2 dilated 3x3 s2", 5, 2, 25),                     # jump 2 -> 4
    ("b3 conv 3x3", 3, 1, 33), ("b3 depthwise 3x3", 3, 1, 41), ("b3 pointwise 1x1", 1, 1, 41),
    ("b3 dilated 3x3 s2", 5, 2, 57),                     # jump 4 -> 8
    ("b4 conv 3x3", 3, 1, 73), ("b4 conv 3x3", 3, 1, 89),
    ("b4 conv 3x3", 3, 1, 105),
]  # fmt: skip
SEED_MAXPOOL_RF = [
    ("b1 conv 3x3", 3, 1, 3), ("b1 conv 3x3", 3, 1, 5),
    ("b1 maxpool 2x2", 2, 2, 6), ("b1 conv 1x1", 1, 1, 6),        # jump 1 -> 2
    ("b2 conv 3x3", 3, 1, 10), ("b2 conv 3x3", 3, 1, 14),
    ("b2 maxpool 2x2", 2, 2, 16), ("b2 conv 1x1", 1, 1, 16),      # jump 2 -> 4
    ("b3 conv 3x3", 3, 1, 24), ("b3 depthwise 3x3", 3, 1, 32), ("b3 pointwise 1x1", 1, 1, 32),
    ("b3 maxpool 2x2", 2, 2, 36), ("b3 conv 1x1", 1, 1, 36),      # jump 4 -> 8
    ("b4 conv 3x3", 3, 1, 52), ("b4 conv 3x3", 3, 1, 68),
    ("b4 conv 3x3", 3, 1, 84),
]  # fmt: skip


def check_rf_table(table: list[tuple[str, int, int, int]]) -> None:
    """The hand table's own arithmetic: each row follows from the one before."""
    field, jump = 1, 1
    for name, kernel, stride, after in table:
        field += (kernel - 1) * jump
        jump *= stride
        assert field == after, name


@pytest.mark.parametrize(
    ("overrides", "table"),
    [((), SEED_RF), (("model.transition.type=maxpool",), SEED_MAXPOOL_RF)],
    ids=["seed", "seed-maxpool"],
)
def test_receptive_field_matches_the_hand_computation(overrides, table):
    check_rf_table(table)
    model = build(*overrides)
    walked = [
        (layer.dilation[0] * (layer.kernel_size[0] - 1) + 1, layer.stride[0])
        if isinstance(layer, torch.nn.Conv2d)
        else (layer.kernel_size, layer.stride)
        for layer in budget.spatial_layers(model, IMAGE)
    ]
    assert walked == [(kernel, stride) for _, kernel, stride, _ in table]
    assert budget.receptive_field(model, IMAGE) == table[-1][3]


@pytest.mark.parametrize(
    ("overrides", "params", "rf"),
    [
        (("model=s9",), 180_298, 105),
        (("model=s9", "model.transition.type=strided"), 180_298, 91),
        # each 3x3 transition 64 -> 32 becomes a 1x1: 3 * (conv(3,64,32) - conv(1,64,32)) fewer
        (("model=s9", "model.transition.type=maxpool"), 180_298 - 3 * (18_464 - 2_080), 84),
        # no stride: every layer after a transition keeps jump 1; 9 plain 3x3 and 3 dilated
        (("model=s9", "model.transition.type=dilated_nostride"), 180_298, 1 + 9 * 2 + 3 * 4),
        (("model=sep_wide",), SEP_WIDE_PARAMS, 76),
    ],
)
def test_parameters_and_receptive_field_of_each_variant(overrides, params, rf):
    model = build(*overrides)
    assert budget.count_parameters(model) == params
    assert budget.receptive_field(model, IMAGE) == rf


@pytest.mark.parametrize("norm_name", NORMS)
@pytest.mark.parametrize("model_name", MODELS)
def test_every_model_and_norm_trains_a_step(model_name, norm_name):
    model = build(f"model={model_name}", f"model/norm={norm_name}")
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    logits = model(x)
    assert logits.shape == (4, 10)
    torch.nn.functional.cross_entropy(logits, y).backward()
    trained = [p for p in model.parameters() if p.requires_grad]  # not a whitened first layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)

    batch_norms = build(f"model={model_name}", "model/norm=batch")
    norm_params = sum(
        p.numel() for m in batch_norms.modules() if isinstance(m, torch.nn.BatchNorm2d)
        for p in m.parameters()
    )  # fmt: skip
    expected = budget.count_parameters(batch_norms) - (norm_params if norm_name == "none" else 0)
    assert budget.count_parameters(model) == expected


@pytest.mark.parametrize("transition", TRANSITIONS)
def test_every_transition_trains_a_step(transition):
    model = build(f"model.transition.type={transition}")
    loss = model(torch.randn(2, 3, 32, 32)).logsumexp(1).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_shipped_models_are_within_the_default_budget():
    limits = preflight.check(compose_train()).budget
    for name in MODELS:
        budget.enforce(build(f"model={name}"), limits, IMAGE)


def test_block_options_reach_the_layers():
    model = build(
        "model.activation=gelu",
        "model.dropout=0",
        "+model.blocks.1.dropout=0.3",
        "+model.blocks.0.separable=true",
        "model/norm=layer",
        "model.whiten=false",  # a depthwise first layer cannot be whitened
    )
    dropouts = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts == [0.3, 0.3]  # block 2's two convolutions only
    assert not any(isinstance(m, torch.nn.ReLU) for m in model.modules())
    assert any(isinstance(m, torch.nn.GELU) for m in model.modules())
    depthwise_convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1
    ]
    assert [m.in_channels for m in depthwise_convs] == [3, 32, 32]  # block 1 twice, block 3
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 1 for m in norms)  # layer norm = GroupNorm(1, C)


def test_dilated_nostride_shrinks_the_map_by_the_dilation():
    model = build(
        "model.transition.type=dilated_nostride", "+model.transition.dilated_nostride.dilation=5"
    )
    sizes = []
    for layer in model.features:
        if isinstance(layer, torch.nn.Conv2d) and layer.dilation == (5, 5):
            layer.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    model(torch.zeros(1, 3, 32, 32))
    assert sizes == [22, 12, 2]  # 2 * dilation less each time


def test_identity_init_passes_inputs_through_the_first_filters_and_keeps_the_rest():
    torch.manual_seed(0)
    plain = build()
    torch.manual_seed(0)
    model = build("model.identity_init=true")
    assert budget.count_parameters(model) == budget.count_parameters(plain) == 180_298
    pairs = [
        (conv, before)
        for conv, before in zip(model.features.modules(), plain.features.modules(), strict=True)
        if isinstance(conv, torch.nn.Conv2d)
    ]
    identities = 0
    for conv, before in pairs:
        cin = conv.in_channels
        if conv.groups == 1 and conv.out_channels >= cin:
            x = torch.randn(2, cin, 9, 9)
            same = [d * (k // 2) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
            passed = torch.nn.functional.conv2d(
                x, conv.weight[:cin], padding=same, dilation=conv.dilation
            )
            assert torch.equal(passed, x)
            assert torch.equal(conv.weight[cin:], before.weight[cin:])  # random, as without
            identities += 1
        else:  # fewer filters than inputs, or depthwise: left as PyTorch initialised them
            assert torch.equal(conv.weight, before.weight)
    # The seed network: 3->32, 32->32 and 32->64 (three each), the separable 1x1 32->64 and
    # the last transition, 64->64.
    assert identities == 9, identities


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ("model.transition.type=pooled", "unknown transition 'pooled'"),
        ("+model.blocks.0.seperable=true", "model.blocks[0]: unknown keys ['seperable']"),
        ("+model.blocks.3.transition.dilation=1", "unknown keys ['dilation']"),
        ("model.activation=swish", "unknown activation 'swish'"),
    ],
)
def test_a_misspelt_model_option_is_refused(overrides, expected):
    with pytest.raises(InstantiationException, match=re.escape(expected)):
        build(overrides)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["budget.max_params=100000"], "180,298 parameters, over budget.max_params=100,000"),
        (
            ["model.transition.type=dilated_nostride"],
            "receptive field 31 pixels, under budget.min_rf=44",
        ),
    ],
)
@pytest.mark.slow
def test_a_network_outside_its_budget_stops_before_loading_data(overrides, expected, tmp_path):
    # The data folder does not exist: the budget must be checked first to be reported.
    proc = run_cli(
        "train", *overrides, "data.format=folder", "data.root=/nonexistent", "logger=none",
        f"hydra.run.dir={tmp_path}", check=False,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert expected in output
    assert "Traceback" not in output and "/nonexistent" not in output
    assert not (tmp_path / "metrics.jsonl").exists()


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sweep_jobs(experiment: str) -> list[list[str]]:
    """The overrides of each job a `-m experiment=<name>` run launches (one list if no sweep)."""
    preset = OmegaConf.load(CONF / "experiment" / f"{experiment}.yaml")
    params = OmegaConf.select(preset, "hydra.sweeper.params") or {}
    jobs = [[f"experiment={experiment}"]]
    for key, values in params.items():
        jobs = [job + [f"{key}={value}"] for job in jobs for value in values.split(",")]
    return jobs


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_job_builds_a_network_within_the_budget(experiment):
    for job in sweep_jobs(experiment):
        cfg = compose_train(*job)
        budget.enforce(instantiate(cfg.model), preflight.check(cfg).budget, IMAGE)


def test_seed_preset_stays_the_defaults():
    """experiment=s9_seed writes the seed recipe out; the defaults must not drift from it."""
    seed = compose_train("experiment=s9_seed")
    assert OmegaConf.to_container(seed) == OmegaConf.to_container(compose_train())
