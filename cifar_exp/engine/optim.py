"""How the weights are updated beyond the optimizer's own rule: parameter groups with their
own decay and learning rate, the warm-up-then-linear-decay schedule, and an exponential
moving average of the weights (the model that is tested and kept when it is on)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_scale: float = 1.0,
    norm_and_bias_decay: float | None = None,
) -> list[dict[str, Any]]:
    """The model's trainable parameters as optimizer groups: the weights (matrices and
    filters), and the rest, i.e. norm layers' scales and shifts and every bias, at `lr_scale`
    times the learning rate and with `norm_and_bias_decay` (None: `weight_decay`). One group
    when the two would be trained alike, as checkpoints from before the split have.

    One-dimensional parameters are the norm layers' and the biases, the split nanoGPT and
    airbench use. Frozen parameters (a whitened first layer) are left out.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = weight_decay if norm_and_bias_decay is None else norm_and_bias_decay
    if lr_scale == 1 and decay == weight_decay:
        return [{"params": trainable}]
    return [
        {"params": [p for p in trainable if p.ndim > 1]},
        {
            "params": [p for p in trainable if p.ndim <= 1],
            "lr": lr * lr_scale,
            "weight_decay": decay,
        },
    ]


class WarmupLinear(LambdaLR):
    """The learning rate rises linearly from 0 over the first `warmup` of the steps, then falls
    linearly to 0 at the last step: a triangle, stepped after every batch. Each parameter
    group keeps its own peak (its learning rate in the optimizer)."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        epochs: int,
        steps_per_epoch: int,
        warmup: float = 0.2,
    ) -> None:
        if not 0 <= warmup < 1:
            raise ValueError(f"warmup={warmup} is a fraction of the steps: choose it in [0, 1)")
        self.total = epochs * steps_per_epoch
        self.warmup_steps = round(warmup * self.total)
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """The fraction of its peak learning rate that step `step` (from 0) trains with."""
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return max(0.0, (self.total - step) / (self.total - self.warmup_steps))


class WeightAverage:
    """An exponential moving average of the model's weights and buffers, updated on every
    `every`-th step of an epoch: average <- d * average + (1 - d) * weights, where the n-th
    update's d = min(decay, (1 + n) / (10 + n)), so the first weights, barely trained, fade
    within a few updates (the warm-up of TensorFlow's ExponentialMovingAverage).

    PyTorch's AveragedModel does the averaging; this adds when and how fast. The averaged
    model is the one tested and kept in checkpoints (`state_dict`). Its BatchNorm statistics
    are averaged with the weights, so it needs no extra pass over the data to recompute them.
    """

    def __init__(self, model: nn.Module, decay: float, every: int = 1) -> None:
        self.averaged = AveragedModel(model, multi_avg_fn=self.update, use_buffers=True)
        self.decay, self.every = decay, every
        self.updates = 0  # AveragedModel's n_averaged, counted here: reading it waits for a GPU

    @torch.no_grad()
    def update(
        self, averages: list[torch.Tensor], currents: list[torch.Tensor], updates: torch.Tensor
    ) -> None:
        """AveragedModel's multi_avg_fn: move the averages toward the current values."""
        n = self.updates
        get_ema_multi_avg_fn(min(self.decay, (1 + n) / (10 + n)))(averages, currents, updates)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def after_step(self, model: nn.Module, step: int) -> None:
        if step % self.every == 0:
            self.averaged.update_parameters(model)
            self.updates += 1

    def state_dict(self) -> dict:
        return self.averaged.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(state["n_averaged"])


def evaluated_weights(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's run tested: the moving average's where there is one."""
    averaged = state.get("ema")
    if averaged is None:
        return state["model"]
    return {k.removeprefix("module."): v for k, v in averaged.items() if k != "n_averaged"}


def as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    """A filter bank (out, in, kh, kw), or any tensor of two or more dimensions, as a matrix
    with one row per output channel: a view of the same memory, in channels_last order where
    the tensor is stored so. The order of the columns does not change Muon's orthogonalised
    update, only which memory it is read from."""
    if tensor.ndim == 4 and tensor.is_contiguous(memory_format=torch.channels_last):
        return tensor.permute(0, 2, 3, 1).flatten(1)
    return tensor.flatten(1)


class MuonForFilters(torch.optim.Optimizer):
    """torch.optim.Muon for every parameter of two or more dimensions (convolution filters,
    seen as matrices by `as_matrix`), and `rest` (a partial torch.optim optimizer, given `lr`,
    `weight_decay` and `rest_options`) for the others: norm layers and biases. Muon takes only
    2-D parameters, so it is given 2-D views of the filters, whose gradients are the filters'
    gradients seen the same way; its in-place updates of the views update the filters.
    Unless `muon_output_layer`, the output layer (the last parameter of two or more dimensions
    in the order given, the model's) goes to `rest` too, as Muon's authors advise: Muon is for
    hidden layers.

    Its param_groups are the two optimizers' own, so a learning-rate scheduler scales both,
    each from its own peak; a group of the given params keeps its lr and weight decay for its
    1-D parameters (param_groups.norm_and_bias).
    """

    def __init__(
        self,
        params: Any,
        rest: Any,
        lr: float,
        weight_decay: float = 0.0,
        filters: Mapping[str, Any] | None = None,
        muon_output_layer: bool = True,
        **rest_options: Any,
    ) -> None:
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        to_muon = [p for group in groups for p in group["params"] if p.ndim >= 2]
        if to_muon and not muon_output_layer:
            to_muon.pop()  # the output layer: the last matrix in the model's order
        muon_ids = {id(p) for p in to_muon}
        self.matrices: list[tuple[nn.Parameter, torch.Tensor]] = []
        muon_params, rest_groups = [], []
        for group in groups:
            for p in group["params"]:
                if id(p) in muon_ids:
                    matrix = nn.Parameter(as_matrix(p.detach()))
                    self.matrices.append((matrix, p))
                    muon_params.append(matrix)
            others = [p for p in group["params"] if id(p) not in muon_ids]
            if others:
                rest_groups.append({**group, "params": others})
        # Either may have nothing to train (a network without norm layers or biases).
        self.muon = torch.optim.Muon(muon_params, **(filters or {})) if muon_params else None
        self.rest = (
            rest(rest_groups, lr=lr, weight_decay=weight_decay, **rest_options)
            if rest_groups
            else None
        )
        self.parts = [part for part in (self.muon, self.rest) if part is not None]
        # Not Optimizer.__init__: the parameters belong to the two optimizers, whose groups
        # and state these are.
        self.defaults = {"lr": lr, "weight_decay": weight_decay}
        self.param_groups = [group for part in self.parts for group in part.param_groups]
        self.state = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        for matrix, filters in self.matrices:
            matrix.grad = None if filters.grad is None else as_matrix(filters.grad)
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for matrix, filters in self.matrices:
            matrix.grad = None
            if filters.grad is not None:
                filters.grad = None if set_to_none else filters.grad.zero_()
        if self.rest is not None:
            self.rest.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {
            name: part.state_dict() if part is not None else None
            for name, part in (("muon", self.muon), ("rest", self.rest))
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, part in (("muon", self.muon), ("rest", self.rest)):
            if part is not None:
                part.load_state_dict(state[name])
