"""Convolutional networks described as a list of blocks, so that a variant is a YAML file.

A block is a few 3x3 convolutions (each conv -> activation -> norm -> dropout, the seed's order)
followed by a transition with no activation, which changes resolution and width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
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

BLOCK_KEYS = {"convs", "transition", "dropout", "separable"}
CONV_KEYS = {"channels", "separable"}
TRANSITION_KEYS = {"channels", "type", *TRANSITIONS}


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
) -> nn.Sequential:
    """A padded 3x3 convolution (or depthwise 3x3 + pointwise 1x1), activation, norm, dropout."""
    if separable:
        conv = [
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch),
            nn.Conv2d(in_ch, out_ch, 1),
        ]
    else:
        conv = [nn.Conv2d(in_ch, out_ch, 3, padding=1)]
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


class ConvNet(nn.Module):
    """Blocks of convolutions, global average pooling and a 1x1 convolution to the classes.

    Each entry of `blocks` is a mapping with
      convs: channels of each convolution; an entry may be a mapping
             {channels: C, separable: true} for a depthwise-separable one;
      transition: {channels: C} and optionally `type` (one of TRANSITIONS; default the
             model's `transition.type`) and per-type geometry, e.g. {dilated: {padding: 2}};
      dropout: this block's rate, in place of the model's (0 leaves the module out);
      separable: the default for the block's convolutions.
    `norm` makes the norm layer for a number of channels (cifar_exp/conf/model/norm/<option>.yaml);
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
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}"
            )
        model_transition = {"type": "dilated", **(transition or {})}
        check_keys("model.transition", model_transition, {"type", *TRANSITIONS})
        stages: list[nn.Module] = []
        ch = in_channels
        for i, block in enumerate(blocks):
            check_keys(f"model.blocks[{i}]", block, BLOCK_KEYS)
            for spec in block["convs"]:
                if not isinstance(spec, Mapping):
                    spec = {"channels": int(spec)}
                check_keys(f"model.blocks[{i}].convs", spec, CONV_KEYS)
                stages.append(
                    conv_unit(
                        ch,
                        spec["channels"],
                        separable=bool(spec.get("separable", block.get("separable", False))),
                        norm=norm,
                        activation=activation,
                        dropout=block.get("dropout", dropout),
                    )
                )
                ch = spec["channels"]
            check_keys(f"model.blocks[{i}].transition", block["transition"], TRANSITION_KEYS)
            stages.append(transition_layer(ch, block["transition"], model_transition))
            ch = block["transition"]["channels"]
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(ch, num_classes, 1)
        if identity_init:
            for conv in self.features.modules():
                full = isinstance(conv, nn.Conv2d) and conv.groups == 1
                if full and conv.out_channels >= conv.in_channels:
                    nn.init.dirac_(conv.weight[: conv.in_channels])
        self.whiten = whiten
        if whiten:
            first = self.features[0][0]
            patch = first.in_channels * first.kernel_size[0] * first.kernel_size[1]
            if first.groups != 1 or first.out_channels % 2 or first.out_channels > 2 * patch:
                raise ValueError(
                    f"model.whiten needs a first convolution with an even number of filters, "
                    f"at most {2 * patch} (two per patch dimension); it has "
                    f"{first.out_channels}{' and is depthwise' if first.groups != 1 else ''}: "
                    "set model.whiten=false to train it from a random start"
                )
            first.weight.requires_grad_(False)

    @torch.no_grad()
    def whiten_first_layer(self, images: Tensor, eps: float = 5e-4) -> None:
        """Set the first convolution's filters from normalised NCHW `images`, before training:
        the eigenvectors of the images' patch covariance with the largest eigenvalues, each
        scaled by 1/sqrt(eigenvalue + eps), and their negatives. Its outputs are decorrelated
        patch components of unit variance, and the activation keeps both signs of them.
        """
        first = self.features[0][0]
        kernel, half = first.kernel_size, first.out_channels // 2
        dim = first.in_channels * kernel[0] * kernel[1]
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
        filters = torch.cat([filters, -filters]).reshape(first.weight.shape)
        first.weight.copy_(filters.to(first.weight))

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x))).flatten(1)
