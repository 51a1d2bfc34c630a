"""Convolutional networks described as a list of blocks, so that a variant is a YAML file.

A block is a few 3x3 convolutions (each Conv -> activation -> norm -> dropout, the seed's order)
followed by a transition convolution with no activation, which changes resolution and width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

NORMS = ("batch", "group", "layer", "instance", "none")


def make_norm(kind: str, channels: int, groups: int = 8) -> nn.Module:
    """The normalisation layer for `channels` feature maps."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(groups, channels)
    if kind == "layer":  # layer norm over a conv map is the usual GroupNorm with one group
        return nn.GroupNorm(1, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose one of {', '.join(NORMS)}")


def conv_unit(
    in_ch: int, out_ch: int, *, separable: bool, norm: str, groups: int, dropout: float
) -> nn.Sequential:
    """A padded 3x3 convolution (or depthwise 3x3 + pointwise 1x1), ReLU, norm and dropout."""
    if separable:
        conv = [
            nn.Conv2d(in_ch, in_ch, 3, padding=1, groups=in_ch),
            nn.Conv2d(in_ch, out_ch, 1),
        ]
    else:
        conv = [nn.Conv2d(in_ch, out_ch, 3, padding=1)]
    layers = [*conv, nn.ReLU(), make_norm(norm, out_ch, groups)]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class ConvNet(nn.Module):
    """Blocks of convolutions, global average pooling and a 1x1 convolution to the classes.

    Each entry of `blocks` is a mapping with
      convs: channels of each convolution; an entry may be a mapping
             {channels: C, separable: true} for a depthwise-separable one;
      transition: {channels, stride, dilation, padding} of the 3x3 transition convolution.
    """

    def __init__(
        self,
        blocks: Sequence[Mapping[str, Any]],
        in_channels: int = 3,
        num_classes: int = 10,
        norm: str = "batch",
        norm_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
        stages: list[nn.Module] = []
        ch = in_channels
        for block in blocks:
            for spec in block["convs"]:
                out, separable = (
                    (spec["channels"], bool(spec.get("separable", False)))
                    if isinstance(spec, Mapping)
                    else (int(spec), False)
                )
                stages.append(
                    conv_unit(
                        ch,
                        out,
                        separable=separable,
                        norm=norm,
                        groups=norm_groups,
                        dropout=dropout,
                    )
                )
                ch = out
            t = block["transition"]
            stages.append(
                nn.Conv2d(
                    ch,
                    t["channels"],
                    3,
                    stride=t.get("stride", 1),
                    dilation=t.get("dilation", 1),
                    padding=t.get("padding", 1),
                )
            )
            ch = t["channels"]
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Conv2d(ch, num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x))).flatten(1)
