"""Albumentations pipelines: uint8 HWC image in, normalised float CHW tensor out.

The train-time augmentations are listed in `conf/augment/<option>.yaml`; the same function
builds the plain test-time pipeline, so both normalise identically.
"""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
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
