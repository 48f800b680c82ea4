"""Batched, on-device augmentation for resident datasets: zero-padded random crop + horizontal flip.

Both are one gather: each output pixel reads one pixel of the zero-padded image, at a row shifted
by the image's vertical offset and a column shifted (and, for flipped images, mirrored) by its
horizontal offset. No Python loop runs per image and nothing waits for the device.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from nulsq.errors import UserError


@dataclass(frozen=True)
class AugmentSpec:
    """Which augmentations the train split gets.

    Args:
        crop_padding: zeros added on each side before a random crop back to the original size
            (0 = no crop).
        flip: mirror each image left-right with probability 1/2.
    """

    crop_padding: int = 0
    flip: bool = False

    @property
    def active(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def draw(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Random parameters for n images: offsets (n, 2) in [0, 2*padding] and flips (n,) bool.

        Args:
            n: number of images.
            generator: the epoch's generator; its device is where the parameters are made.
        """
        device = generator.device
        offsets = torch.randint(
            0, 2 * self.crop_padding + 1, (n, 2), generator=generator, device=device
        )
        flips = torch.rand(n, generator=generator, device=device) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return offsets, flips


def augment_spec(cfg: Mapping[str, Any] | None, default: AugmentSpec) -> AugmentSpec:
    """Read `dataset.augment`; null (or an absent key) keeps the dataset's default.

    Args:
        cfg: the `dataset.augment` mapping or None.
        default: the dataset's own augmentation.
    """
    if cfg is None:
        return default
    padding = cfg.get("crop_padding", None)
    flip = cfg.get("flip", None)
    padding = default.crop_padding if padding is None else padding
    flip = default.flip if flip is None else flip
    if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
        raise UserError(f"dataset.augment.crop_padding must be an integer >= 0, got {padding!r}")
    if not isinstance(flip, bool):
        raise UserError(f"dataset.augment.flip must be true or false, got {flip!r}")
    return AugmentSpec(crop_padding=padding, flip=flip)


def crop_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Zero-pad by `padding`, crop back to H x W at `offsets`, mirror where `flips`.

    Args:
        images: [B, C, H, W], any dtype (uint8 for resident datasets).
        offsets: [B, 2] int64, (row, column) of the crop's top-left corner in the padded image,
            each in [0, 2 * padding].
        flips: [B] bool, mirror the crop left-right.
        padding: zeros on each side.

    Returns:
        [B, C, H, W] contiguous, same dtype as `images`.
    """
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    width = w + 2 * padding
    rows = offsets[:, :1] + torch.arange(h, device=images.device)  # [B, H]
    cols = torch.arange(w, device=images.device).expand(b, w)  # [B, W]
    cols = torch.where(flips[:, None], w - 1 - cols, cols) + offsets[:, 1:]
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(b, 1, h * w)
    out = torch.gather(padded.reshape(b, c, -1), 2, flat.expand(b, c, h * w))
    return out.view(b, c, h, w)
