"""Train-time augmentation, in two implementations of the same recipe.

`pipeline`: albumentations, one uint8 HWC image at a time in DataLoader workers; the reference.
`BatchAugment`: tensor operations on a whole uint8 NCHW batch on its device; the fast path.
The transforms are listed in `conf/augment/<option>.yaml`; `plain` gives the test-time
counterpart of either, so train and test normalise identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import torch
import torch.nn.functional as F
from albumentations.pytorch import ToTensorV2


def pipeline(
    mean: Sequence[float],
    std: Sequence[float],
    before_normalize: Sequence[A.BasicTransform] = (),
    after_normalize: Sequence[A.BasicTransform] = (),
) -> A.Compose:
    """Augment, normalise to the data set's mean and std, augment more, convert to a tensor.

    Transforms after normalisation see 0 where the data set's mean colour is, which is how a
    cutout hole gets filled with the mean.
    """
    return A.Compose(
        [
            *before_normalize,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
            *after_normalize,
            ToTensorV2(),
        ]
    )


class BatchAugment:
    """The s9 augmentations as tensor operations on a whole batch, on the batch's device.

    uint8 NCHW images in, normalised float images out. Every image draws its own parameters:
    a horizontal flip (`flip_p`); with probability `affine_p` a shift of up to `translate` of
    the image size per axis (in whole pixels), a scale in `scale` and a rotation within
    +-`rotate` degrees about the centre, with reflected borders, like the reference's Affine;
    and with probability `cutout_p` one `cutout_size` square hole inside the image, filled
    with the mean.
    With the default arguments it only normalises (the test-time counterpart).
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        flip_p: float = 0.0,
        affine_p: float = 0.0,
        translate: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
        rotate: float = 0.0,
        cutout_p: float = 0.0,
        cutout_size: int = 16,
    ) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self.flip_p, self.affine_p, self.cutout_p = flip_p, affine_p, cutout_p
        self.translate, self.scale, self.rotate = translate, tuple(scale), rotate
        self.cutout_size = cutout_size

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        x = (images.float() / 255 - mean) / std
        if self.flip_p or self.affine_p:
            x = self._flip_and_affine(x, generator)
        if self.cutout_p:
            x = self._cutout(x, generator)
        return x

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor, gen) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen, device=like.device)

    def _flip_and_affine(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """One grid_sample per batch: flip and affine folded into each image's sampling matrix."""
        n = len(x)
        flip = torch.rand(n, generator=gen, device=x.device) < self.flip_p
        affine = torch.rand(n, generator=gen, device=x.device) < self.affine_p
        angle = torch.deg2rad(self._uniform(n, -self.rotate, self.rotate, x, gen)) * affine
        scale = torch.where(affine, self._uniform(n, *self.scale, x, gen), 1.0)
        # Whole pixels, truncated toward zero, as albumentations' Affine does; in grid
        # coordinates the image spans [-1, 1], so a shift of k pixels is 2k / size.
        size = torch.tensor(x.shape[:-3:-1], device=x.device)  # (width, height)
        pixels = torch.trunc(
            self.translate * size * (2 * torch.rand(n, 2, generator=gen, device=x.device) - 1)
        )
        shift = 2 * pixels / size * affine[:, None]
        # affine_grid maps output to input positions: the inverse of flip, rotate and scale.
        cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
        sign = torch.where(flip, -1.0, 1.0)
        inverse = torch.stack(
            [torch.stack([sign * cos, sign * sin], 1), torch.stack([-sin, cos], 1)], 1
        )
        theta = torch.cat([inverse, -(inverse @ shift[:, :, None])], 2)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, padding_mode="reflection", align_corners=False)

    def _cutout(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        n, _, height, width = x.shape
        size = self.cutout_size
        apply = torch.rand(n, generator=gen, device=x.device) < self.cutout_p
        top = torch.randint(0, height - size + 1, (n, 1), generator=gen, device=x.device)
        left = torch.randint(0, width - size + 1, (n, 1), generator=gen, device=x.device)
        rows = torch.arange(height, device=x.device)
        cols = torch.arange(width, device=x.device)
        in_rows = (rows >= top) & (rows < top + size)  # (n, height)
        in_cols = (cols >= left) & (cols < left + size)
        hole = in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None]
        return x.masked_fill(hole[:, None], 0.0)  # 0 is the mean after normalisation


def plain(train_augment: A.Compose | BatchAugment, mean: Sequence[float], std: Sequence[float]):
    """The test-time counterpart of a train-time augmentation: normalisation only, same kind."""
    if isinstance(train_augment, BatchAugment):
        return BatchAugment(mean, std)
    return pipeline(mean, std)
