"""Train-time augmentation, in two implementations of the same recipe.

`Pipeline`: albumentations, one uint8 HWC image at a time in DataLoader workers; the reference.
`BatchAugment`: tensor operations on a whole uint8 NCHW batch on its device; the fast path.
The transforms are listed in `conf/augment/<option>.yaml`. Each kind knows its test-time
counterpart (`test_time`: the same normalisation, nothing else), the loader that feeds it
(`loader`) and whether it fits the images (`check`).
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from cifar_exp.data.datasets import ImageSet
from cifar_exp.data.loaders import Batching, TensorLoader, WorkerLoader
from cifar_exp.errors import UserError

if TYPE_CHECKING:  # imported when a Pipeline is built: only augment=s9 pays for albumentations
    import albumentations as A


class Augmentation(ABC):
    """What the builder asks of every augmentation: the loader that feeds it (`Loader`), its
    test-time counterpart, and whether it fits the images."""

    Loader: ClassVar[type[TensorLoader | WorkerLoader]]

    def loader(self, data: ImageSet, batching: Batching) -> TensorLoader | WorkerLoader:
        """Batches of `data` (all of it, or this rank's share) augmented by this, drawn as
        `batching` says."""
        return self.Loader(data, self, batching)

    @abstractmethod
    def test_time(self) -> Augmentation:
        """The same normalisation and nothing else."""

    @abstractmethod
    def check(self, image_size: int) -> None:
        """Refuse parameters that do not fit images of `image_size` pixels."""


class Pipeline(Augmentation):
    """Augment, normalise to the data set's mean and std, augment more, convert to a tensor:
    an albumentations pipeline, called on one uint8 HWC image at a time.

    Transforms after normalisation see 0 where the data set's mean colour is, which is how a
    cutout hole gets filled with the mean. Its loader runs it image by image in DataLoader
    workers and hands CPU tensors to the loop.
    """

    Loader = WorkerLoader

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        before_normalize: Sequence[A.BasicTransform] = (),
        after_normalize: Sequence[A.BasicTransform] = (),
    ) -> None:
        import albumentations as A
        from albumentations.pytorch import ToTensorV2

        self.mean, self.std = tuple(mean), tuple(std)
        self.compose = A.Compose(
            [
                *before_normalize,
                A.Normalize(mean=self.mean, std=self.std, max_pixel_value=255.0),
                *after_normalize,
                ToTensorV2(),
            ]
        )

    def __call__(self, **data: np.ndarray) -> dict:
        return self.compose(**data)

    def set_random_seed(self, seed: int) -> None:
        self.compose.set_random_seed(seed)

    def test_time(self) -> Pipeline:
        return Pipeline(self.mean, self.std)

    def check(self, image_size: int) -> None:
        """Apply every transform once (whatever its probability) to an image of the data's
        size: a hole or crop larger than the image fails here, not in a worker mid-epoch."""
        image: np.ndarray = np.zeros((image_size, image_size, len(self.mean)), np.uint8)
        for transform in copy.deepcopy(self.compose.transforms):
            transform.p = 1.0
            try:
                image = transform(image=image)["image"]
            except Exception as err:  # noqa: BLE001 - albumentations raises many types
                raise UserError(
                    f"augment: {type(transform).__name__} cannot run on {image_size}x"
                    f"{image_size} images (data.image_size): {err}; change its parameters"
                ) from None


class BatchAugment(Augmentation):
    """The s9 augmentations as tensor operations on a whole batch, on the batch's device.

    uint8 NCHW images in, normalised float images out. Every image draws its own parameters:
    a shift of up to `crop_pad` pixels per axis, uniform in whole pixels, by padding with the
    reflected border and cropping; a horizontal flip (`flip_p`), or with `alternate_flip` a
    flip on every other epoch (half the images on odd epochs, the other half on even ones:
    each image is seen both ways within any two epochs); with probability `affine_p` a shift
    of up to `translate` of the image size per axis (in whole pixels), a scale in `scale` and
    a rotation within +-`rotate` degrees about the centre, with reflected borders, like the
    reference's Affine;
    and with probability `cutout_p` one `cutout_size` square hole inside the image, filled
    with the mean.
    With the default arguments it only normalises (the test-time counterpart). Its loader
    holds the whole split on the training device and slices batches there.
    """

    Loader = TensorLoader

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
        crop_pad: int = 0,
        alternate_flip: bool = False,
    ) -> None:
        for name, p in (("flip_p", flip_p), ("affine_p", affine_p), ("cutout_p", cutout_p)):
            if not 0 <= p <= 1:
                raise ValueError(f"augment.{name}={p} is a probability: choose it in [0, 1]")
        if not 0 <= translate < 1:
            raise ValueError(f"augment.translate={translate} is a fraction of the image: [0, 1)")
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"augment.scale={list(scale)} must be [low, high], 0 < low <= high")
        if cutout_size < 1:
            raise ValueError(f"augment.cutout_size={cutout_size} must be at least 1 pixel")
        if crop_pad < 0:
            raise ValueError(f"augment.crop_pad={crop_pad} is a number of pixels: 0 or more")
        self.mean, self.std = tuple(mean), tuple(std)
        self.flip_p, self.affine_p, self.cutout_p = flip_p, affine_p, cutout_p
        self.translate, self.scale, self.rotate = translate, tuple(scale), rotate
        self.cutout_size, self.crop_pad, self.alternate_flip = cutout_size, crop_pad, alternate_flip
        self.statistics: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def test_time(self) -> BatchAugment:
        return BatchAugment(self.mean, self.std)

    def check(self, image_size: int) -> None:
        """The cutout hole must fit inside the image, and the reflected border of a shift."""
        if self.cutout_p and self.cutout_size > image_size:
            raise UserError(
                f"augment.cutout_size={self.cutout_size} is larger than the {image_size}-pixel "
                "images (data.image_size); make it smaller, or augment.cutout_p=0"
            )
        if self.crop_pad >= image_size:
            raise UserError(
                f"augment.crop_pad={self.crop_pad} pixels cannot be reflected from "
                f"{image_size}-pixel images (data.image_size); make it at most {image_size - 1}"
            )

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        indices: torch.Tensor | None = None,
        epoch: int = 0,
    ) -> torch.Tensor:
        """uint8 NCHW images in, augmented and normalised float images out; `indices` (the
        images' places in their split) and `epoch` decide alternating flips."""
        mean, std = self.normalisation(images.device)
        x = (images.float() / 255 - mean) / std
        if self.crop_pad:
            x = self._crop(x, generator)
        if self.flip_p or self.affine_p or self.alternate_flip:
            x = self._flip_and_affine(x, self._flips(x, generator, indices, epoch), generator)
        if self.cutout_p:
            x = self._cutout(x, generator)
        return x

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as (1, C, 1, 1) tensors on `device`, made once: copying them there
        every batch would make the host wait for the GPU every step."""
        if device not in self.statistics:
            self.statistics[device] = tuple(
                torch.tensor(values, device=device).view(1, -1, 1, 1)
                for values in (self.mean, self.std)
            )
        return self.statistics[device]

    def _uniform(self, n: int, low: float, high: float, like: torch.Tensor, gen) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=gen, device=like.device)

    def _flips(
        self, x: torch.Tensor, gen: torch.Generator | None, indices: torch.Tensor | None, epoch: int
    ) -> torch.Tensor:
        """Which images to flip: at random (`flip_p`), or every other epoch from a phase that
        a multiplicative hash of the image's index gives (the same on every run and resume)."""
        if not self.alternate_flip:
            return torch.rand(len(x), generator=gen, device=x.device) < self.flip_p
        if indices is None:
            raise ValueError("augment.alternate_flip needs the images' indices and the epoch")
        phase = (indices * 2654435761) % 2**32 >= 2**31  # Knuth's hash, its top bit
        return phase ^ bool(epoch % 2)

    def _crop(self, x: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """Each image shifted by a whole number of pixels in [-crop_pad, crop_pad] per axis:
        cropped from the image padded with its reflected border."""
        n, _, height, width = x.shape
        pad = self.crop_pad
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        top, left = torch.randint(0, 2 * pad + 1, (2, n, 1), generator=gen, device=x.device)
        rows = (top + torch.arange(height, device=x.device))[:, :, None]  # (n, height, 1)
        cols = (left + torch.arange(width, device=x.device))[:, None, :]  # (n, 1, width)
        batch = torch.arange(n, device=x.device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    def _flip_and_affine(
        self, x: torch.Tensor, flip: torch.Tensor, gen: torch.Generator | None
    ) -> torch.Tensor:
        """One grid_sample per batch: flip and affine folded into each image's sampling matrix."""
        n = len(x)
        affine = torch.rand(n, generator=gen, device=x.device) < self.affine_p
        angle = torch.deg2rad(self._uniform(n, -self.rotate, self.rotate, x, gen)) * affine
        scale = torch.where(affine, self._uniform(n, *self.scale, x, gen), 1.0)
        # Whole pixels, truncated toward zero, as albumentations' Affine does; in grid
        # coordinates the image spans [-1, 1], so a shift of k pixels is 2k / size. The sizes
        # stay Python numbers: a tensor made of them would be a copy to the GPU every batch.
        height, width = x.shape[-2:]
        unit = 2 * torch.rand(n, 2, generator=gen, device=x.device) - 1
        pixels = torch.trunc(
            torch.stack(
                [self.translate * width * unit[:, 0], self.translate * height * unit[:, 1]], 1
            )
        )
        shift = torch.stack([2 * pixels[:, 0] / width, 2 * pixels[:, 1] / height], 1)
        shift = shift * affine[:, None]
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
