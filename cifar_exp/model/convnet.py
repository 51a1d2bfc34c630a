"""Convolutional networks described as a list of blocks, so that a variant is a YAML file.

A block is a few 3x3 convolutions (each conv -> activation -> norm -> dropout, the seed's order)
followed by a transition with no activation, which changes resolution and width. A block, or a
group of its convolutions, may add its input to its output (`Residual`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}

# The geometry of each transition type. A model's or a block's `transition` mapping changes
# it for one type by naming the type, e.g. {dilated: {padding: 2}}.
TRANSITIONS: dict[str, dict[str, int]] = {
    # the seed's: a strided, dilated 3x3 convolution
    "dilated": {"kernel_size": 3, "stride": 2, "dilation": 2, "padding": 1},
    "strided": {"kernel_size": 3, "stride": 2, "dilation": 1, "padding": 1},
    # no stride and no padding: the map shrinks by 2 * dilation
    "dilated_nostride": {"kernel_size": 3, "stride": 1, "dilation": 2, "padding": 0},
    # max-pooling (this geometry), then a 1x1 convolution to the new width
    "maxpool": {"kernel_size": 2, "stride": 2},
    # a plain 3x3 convolution that keeps the map size: the seed's last block, which only widens
    "conv": {"kernel_size": 3, "stride": 1, "dilation": 1, "padding": 1},
}

BLOCK_KEYS = {"convs", "transition", "dropout", "separable", "residual"}
CONV_KEYS = {"channels", "separable", "pool"}
TRANSITION_KEYS = {"channels", "type", *TRANSITIONS}
GLOBAL_POOLS: dict[str, type[nn.Module]] = {
    "avg": nn.AdaptiveAvgPool2d,
    "max": nn.AdaptiveMaxPool2d,
}
# Layers that move the receptive field: everything else (norms, activations, dropout) keeps it.
SPATIAL = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the channel count first, like the other norm layers' constructors."""
    return nn.GroupNorm(groups, channels)


def conv_unit(
    in_ch: int,
    out_ch: int,
    *,
    separable: bool,
    norm: Callable[[int], nn.Module],
    activation: str,
    dropout: float,
    pool: int = 0,
) -> nn.Sequential:
    """A padded 3x3 convolution (or depthwise 3x3 + pointwise 1x1), a `pool` x `pool` max-pool
    if `pool`, activation, norm, dropout."""
    if separable:
        conv = [
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch),
            nn.Conv2d(in_ch, out_ch, 1),
        ]
    else:
        conv = [nn.Conv2d(in_ch, out_ch, 3, padding=1)]
    if pool:  # before the activation: max-pooling commutes with it, on a quarter of the pixels
        conv.append(nn.MaxPool2d(pool))
    layers = [*conv, ACTIVATIONS[activation](), norm(out_ch)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def transition_layer(
    in_ch: int, spec: Mapping[str, Any], model_transition: Mapping[str, Any]
) -> nn.Module:
    """The block's transition: its own type or the model's, with the type's geometry updated
    first by the model's and then by the block's settings for that type."""
    kind = spec.get("type") or model_transition["type"]
    if kind not in TRANSITIONS:
        raise ValueError(f"unknown transition {kind!r}; choose one of {', '.join(TRANSITIONS)}")
    geometry = {
        **TRANSITIONS[kind],
        **model_transition.get(kind, {}),
        **spec.get(kind, {}),
    }
    out_ch = spec["channels"]
    if kind == "maxpool":
        return nn.Sequential(nn.MaxPool2d(**geometry), nn.Conv2d(in_ch, out_ch, 1))
    return nn.Conv2d(in_ch, out_ch, **geometry)


def check_keys(where: str, spec: Mapping[str, Any], allowed: set[str]) -> None:
    """Refuse misspelt keys in a block description, which would otherwise be ignored."""
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")


def first(value: int | tuple[int, ...]) -> int:
    """The height entry of a kernel/stride/dilation (the networks here are square)."""
    return value[0] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Window:
    """Where a stack of layers reads along one axis: output i is centred on input pixel
    `offset + stride * i` and sees `growth + 1` pixels (padding and the image's edges aside)."""

    growth: int = 0
    stride: int = 1
    offset: int = 0

    @classmethod
    def of(cls, layer: nn.Module) -> Window:
        """One convolution's or pool's window."""
        span = first(getattr(layer, "dilation", 1)) * (first(layer.kernel_size) - 1)
        padding = layer.padding
        if isinstance(padding, str):  # Conv2d's "same" or "valid"
            padding = span // 2 if padding == "same" else 0
        return cls(span, first(layer.stride), span // 2 - first(padding))

    def then(self, after: Window) -> Window:
        """This window followed by `after`'s, whose pixels are this one's outputs."""
        return Window(
            self.growth + after.growth * self.stride,
            self.stride * after.stride,
            self.offset + after.offset * self.stride,
        )


def window(layers: Iterable[nn.Module]) -> Window:
    """The window of the convolutions and pools among `layers`, run in the order given. A
    Residual counts as one layer (its own window); the modules inside it are skipped."""
    total, inside = Window(), set()
    for layer in layers:
        if layer in inside:
            continue
        if isinstance(layer, Residual):
            inside.update(layer.modules())
            total = total.then(layer.window)
        elif isinstance(layer, SPATIAL):
            total = total.then(Window.of(layer))
    return total


class Residual(nn.Module):
    """`body(x) + shortcut(x)`: the shortcut is the identity, or, where the body changes the
    width or the map (stride, or a shift from unpadded or dilated layers), a 1x1 convolution
    with the body's stride and a norm, reading the input pixel at the centre of each output's
    window (ResNet's projection shortcut). The sum is not followed by an activation: the
    identity path stays clean, as in pre-activation ResNets, while each convolution keeps the
    seed's conv -> activation -> norm order.
    """

    def __init__(
        self, body: nn.Sequential, in_ch: int, out_ch: int, norm: Callable[[int], nn.Module]
    ) -> None:
        super().__init__()
        self.body = body
        body_window = window(body.modules())
        if body_window.offset < 0:
            raise ValueError(
                "residual: the layers pad more than half their kernel, so the skip cannot "
                "line up with their outputs; lower the transition's padding"
            )
        reshaped = in_ch != out_ch or body_window.stride > 1 or body_window.offset > 0
        self.shortcut = (
            nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=body_window.stride, bias=False),
                          norm(out_ch))
            if reshaped
            else nn.Identity()
        )  # fmt: skip
        # The 1x1 skip sees one pixel, never more than the body: the deepest path sets the field.
        self.window = body_window

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        start = self.window.offset
        skip = self.shortcut(x[..., start:, start:])
        return out + skip[..., : out.shape[-2], : out.shape[-1]]


def conv_layers(
    specs: Sequence[Any],
    in_ch: int,
    where: str,
    norm: Callable[[int], nn.Module],
    separable: bool,
    **unit: Any,
) -> tuple[list[nn.Module], int]:
    """The modules of a block's `convs` entries from `in_ch` channels, and their output width.
    An entry {residual: [entries]} is a group whose input is added to its output; `separable`
    is the entries' default, `unit` conv_unit's other settings."""
    layers: list[nn.Module] = []
    for spec in specs:
        if not isinstance(spec, Mapping):
            spec = {"channels": int(spec)}
        if "residual" in spec:
            check_keys(where, spec, {"residual"})
            if not spec["residual"]:
                raise ValueError(f"{where}: an empty residual group; give it convolutions")
            group, out_ch = conv_layers(spec["residual"], in_ch, where, norm, separable, **unit)
            layers.append(Residual(nn.Sequential(*group), in_ch, out_ch, norm))
        else:
            check_keys(where, spec, CONV_KEYS)
            pool = spec.get("pool", 0)
            # a bool is an int to Python, and `pool: true` would be a 1x1 pool that does nothing
            if isinstance(pool, bool) or not isinstance(pool, int) or pool < 0:
                raise ValueError(f"{where}: pool={pool!r}; give the max-pool's size, e.g. 2")
            out_ch = spec["channels"]
            layers.append(
                conv_unit(
                    in_ch,
                    out_ch,
                    norm=norm,
                    pool=pool,
                    separable=bool(spec.get("separable", separable)),
                    **unit,
                )
            )
        in_ch = out_ch
    return layers, in_ch


class ConvNet(nn.Module):
    """Blocks of convolutions, global pooling and a 1x1 convolution to the classes.

    Each entry of `blocks` is a mapping with
      convs: channels of each convolution; an entry may be a mapping
             {channels: C, separable: true, pool: 2} for a depthwise-separable one and/or
             one followed by a 2x2 max-pool, or {residual: [entries]} for a group of
             convolutions whose input is added to their output (`Residual`);
      transition (optional): {channels: C} and optionally `type` (one of TRANSITIONS; default
             the model's `transition.type`) and per-type geometry, e.g. {dilated: {padding: 2}};
      residual: true adds the block's input to its output (after the transition);
      dropout: this block's rate, in place of the model's (0 leaves the module out);
      separable: the default for the block's convolutions.
    `global_pool`: avg or max, over the last map before the classifier.
    `norm` makes the norm layer for a number of channels (conf/model/norm/<option>.yaml);
    `transition` is {type: <default type>} plus optional per-type geometry for every block.
    `whiten`: the first convolution's filters are frozen at a whitening of the training
    images' patches (`whiten_first_layer`), after airbench; the parameter count is unchanged.
    `identity_init`: every full convolution with at least as many filters as input channels
    starts with its first filters passing the inputs through (`nn.init.dirac_`), the others
    at PyTorch's random init, after airbench; a trained-from-scratch network then starts
    close to a shallow one, which speeds up short runs.
    """

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any]],
        in_channels: int = 3,
        num_classes: int = 10,
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
        activation: str = "relu",
        dropout: float = 0.0,
        transition: Mapping[str, Any] | None = None,
        whiten: bool = False,
        identity_init: bool = False,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        model_transition = {"type": "dilated", **(transition or {})}
        check_keys("model.transition", model_transition, {"type", *TRANSITIONS})
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(
                f"unknown global_pool {global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}"
            )
        stages: list[nn.Module] = []
        ch = in_channels
        for i, block in enumerate(blocks):
            where = f"model.blocks[{i}]"
            check_keys(where, block, BLOCK_KEYS)
            layers, out_ch = conv_layers(
                block["convs"], ch, f"{where}.convs", norm, block.get("separable", False),
                activation=activation, dropout=block.get("dropout", dropout),
            )  # fmt: skip
            if "transition" in block:
                check_keys(f"{where}.transition", block["transition"], TRANSITION_KEYS)
                layers.append(transition_layer(out_ch, block["transition"], model_transition))
                out_ch = block["transition"]["channels"]
            if block.get("residual", False) not in (True, False):
                raise ValueError(f"{where}: residual={block['residual']!r}; true or false")
            if block.get("residual", False):
                layers = [Residual(nn.Sequential(*layers), ch, out_ch, norm)]
            stages += layers
            ch = out_ch
        self.features = nn.Sequential(*stages)
        self.pool = GLOBAL_POOLS[global_pool](1)
        self.classifier = nn.Conv2d(ch, num_classes, 1)
        if identity_init:
            for conv in self.features.modules():
                full = isinstance(conv, nn.Conv2d) and conv.groups == 1
                if full and conv.out_channels >= conv.in_channels:
                    nn.init.dirac_(conv.weight[: conv.in_channels])
        self.whiten = whiten
        if whiten:
            stem = self.stem
            patch = stem.in_channels * stem.kernel_size[0] * stem.kernel_size[1]
            if stem.groups != 1 or stem.out_channels % 2 or stem.out_channels > 2 * patch:
                raise ValueError(
                    f"model.whiten needs a first convolution with an even number of filters, "
                    f"at most {2 * patch} (two per patch dimension); it has "
                    f"{stem.out_channels}{' and is depthwise' if stem.groups != 1 else ''}: "
                    "set model.whiten=false to train it from a random start"
                )
            stem.weight.requires_grad_(False)

    @property
    def stem(self) -> nn.Conv2d:
        """The first convolution the input meets."""
        return next(m for m in self.features.modules() if isinstance(m, nn.Conv2d))

    @torch.no_grad()
    def whiten_first_layer(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the first convolution's filters from normalised NCHW `images`, before training:
        the eigenvectors of the images' patch covariance with the largest eigenvalues, each
        scaled by 1/sqrt(eigenvalue + eps), and their negatives. Its outputs are decorrelated
        patch components of unit variance, and the activation keeps both signs of them.
        """
        stem = self.stem
        kernel, half = stem.kernel_size, stem.out_channels // 2
        dim = stem.in_channels * kernel[0] * kernel[1]
        moment, total, count = (
            torch.zeros(dim, dim, dtype=torch.float64),
            torch.zeros(dim, dtype=torch.float64),
            0,
        )
        for chunk in images.split(256):  # the patches of all images would take gigabytes
            patches = F.unfold(chunk.double().cpu(), kernel).transpose(1, 2).reshape(-1, dim)
            moment += patches.T @ patches
            total += patches.sum(0)
            count += len(patches)
        mean = total / count
        values, vectors = torch.linalg.eigh(moment / count - torch.outer(mean, mean))
        filters = (vectors[:, -half:] / (values[-half:] + eps).sqrt()).T
        filters = torch.cat([filters, -filters]).reshape(stem.weight.shape)
        stem.weight.copy_(filters.to(stem.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x))).flatten(1)
