"""What a built network costs and sees: its parameters and receptive field, and the limits on both.

Both are read from the modules themselves, so any network the config builds is measured the same
way, whatever its YAML says.
"""

from __future__ import annotations

import torch
from torch import nn

from cifar_exp.errors import UserError
from cifar_exp.model.convnet import GLOBAL_POOLS, SPATIAL, Residual, window
from cifar_exp.settings import BudgetSettings

GLOBAL = tuple(GLOBAL_POOLS.values())


class OverBudget(UserError):
    """The network has more parameters, or sees less, than its budget allows."""


def count_parameters(model: nn.Module) -> int:
    """Every parameter, frozen ones too (model.whiten's filters are still the network's)."""
    return sum(p.numel() for p in model.parameters())


def spatial_layers(model: nn.Module, image_shape: tuple[int, int, int]) -> list[nn.Module]:
    """The convolutions, pools and Residual blocks in the order a forward pass enters them, up
    to global pooling: a Residual before the layers inside it."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_pre_hook(lambda module, _inputs: order.append(module))
        for m in model.modules()
        if isinstance(m, (*SPATIAL, *GLOBAL, Residual))
    ]
    was_training = model.training
    try:
        model.eval()
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=param.device))
    except RuntimeError as err:
        first_line = str(err).strip().splitlines()[0]
        raise UserError(
            f"the network cannot run on {'x'.join(map(str, image_shape))} images "
            f"(channels x height x width): {first_line}; change its blocks or transitions"
        ) from None
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    global_at = next((i for i, m in enumerate(order) if isinstance(m, GLOBAL)), len(order))
    return order[:global_at]


def receptive_field(model: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Side in input pixels of the region one unit of the last map before global pooling sees.

    Each layer widens it by (effective kernel - 1) times the product of the strides before it,
    where a dilated kernel's effective size is dilation * (kernel - 1) + 1; a Residual block
    widens it as its deepest path does. Padding and the image's edges are not counted, so it
    may exceed the image.
    """
    return window(spatial_layers(model, image_shape)).growth + 1


def enforce(
    model: nn.Module, limits: BudgetSettings, image_shape: tuple[int, int, int]
) -> tuple[int, int]:
    """The network's parameters and receptive field (on images of `image_shape`); refuses a
    network over `limits.max_params` or under `limits.min_rf`."""
    num_params, rf = count_parameters(model), receptive_field(model, image_shape)
    problems = []
    if limits.max_params is not None and num_params > limits.max_params:
        problems.append(f"{num_params:,} parameters, over budget.max_params={limits.max_params:,}")
    if limits.min_rf is not None and rf < limits.min_rf:
        problems.append(f"receptive field {rf} pixels, under budget.min_rf={limits.min_rf}")
    if problems:
        raise OverBudget(
            "The network is outside its budget: "
            + "; ".join(problems)
            + ". Change the model, or the limits (budget.max_params=N budget.min_rf=N)."
        )
    return num_params, rf
