"""`digits`, the embedded default dataset: scikit-learn's 1797 real 8x8 handwritten digits.

It ships inside scikit-learn, so `python train.py` runs offline in minutes on a CPU. Images are
scaled from 0..16 to 0..255, upsampled bilinearly to 32x32 (CIFAR models take them unchanged) and
copied to 3 channels. The official split is a fixed stratified 80/20 drawn from `split_seed`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from nulsq.data.augment import AugmentSpec
from nulsq.data.bundle import DATASETS, DataBundle, setting
from nulsq.data.split import stratified_split
from nulsq.data.tensor_loader import resident_bundle
from nulsq.errors import UserError

TEST_FRACTION = 0.2
# Measured over all 1797 images at 32x32 (uint8 / 255); the 3 channels are copies.
MEAN = (0.3052,) * 3
STD = (0.3236,) * 3
# Small shifts only: a mirrored digit is a different digit (or none).
DEFAULT_AUGMENT = AugmentSpec(crop_padding=2, flip=False)


def digit_images(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (uint8 [N, 3, S, S], int64 labels [N]).

    Args:
        image_size: side S of the upsampled images.
    """
    pixels, labels = load_digits(return_X_y=True)
    small = torch.from_numpy(pixels).float().view(-1, 1, 8, 8) * (255.0 / 16.0)
    large = F.interpolate(small, size=image_size, mode="bilinear", align_corners=False)
    images = large.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(labels).long()


@DATASETS.register("digits")
def build_digits(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int, world_size: int
) -> DataBundle:
    """Digits as a resident dataset (see `resident_bundle` for the keys it reads).

    Args:
        cfg: the dataset config; `image_size` (default 32), `split_seed` (default 0).
        device: where the data lives.
        seed: trainer seed (shuffling, augmentation).
        rank: this process's rank.
        world_size: number of processes.
    """
    image_size = int(setting(cfg, "image_size", 32))
    if image_size < 8:
        raise UserError(f"dataset.image_size must be >= 8 for digits (8x8 scans), got {image_size}")
    images, labels = digit_images(image_size)
    split_seed = int(setting(cfg, "split_seed", 0))
    train, test = stratified_split(labels.numpy(), TEST_FRACTION, split_seed, "test")
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    return resident_bundle(
        cfg, device, seed, rank, world_size,
        train=(images[train_t], labels[train_t]), test=(images[test_t], labels[test_t]),
        num_classes=10, mean=MEAN, std=STD, default_augment=DEFAULT_AUGMENT,
    )
