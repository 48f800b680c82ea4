"""`synthetic`: generated images of any size with learnable labels, for tests and benchmarks.

Each class has a smooth random prototype (Gaussian noise on a 4x4 grid, upsampled bilinearly); a
sample is its class prototype plus pixel noise, stored as uint8 like a real dataset. A small net
separates the classes within a few steps. Everything is drawn from `split_seed`, so the data are
the same for every trainer seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from nulsq.data.augment import AugmentSpec
from nulsq.data.bundle import DATASETS, DataBundle, mix_seed, setting
from nulsq.data.tensor_loader import resident_bundle
from nulsq.errors import UserError

NOISE = 0.6  # pixel noise relative to the prototypes' unit scale
# uint8 = 128 + 48 * value, so the 0..1 images have mean 0.5 and std about 0.2.
MEAN, STD = 0.5, 0.2
DEFAULT_AUGMENT = AugmentSpec(crop_padding=2, flip=False)


def synthetic_split(
    prototypes: torch.Tensor, n: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples (uint8 [n, C, S, S], int64 labels [n]) around `prototypes` [K, C, S, S].

    Args:
        prototypes: one smooth image per class.
        n: number of samples; classes are balanced (they differ by at most one sample).
        generator: CPU generator the labels and noise are drawn from.
    """
    k = prototypes.shape[0]
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=generator)]
    noise = torch.randn((n, *prototypes.shape[1:]), generator=generator)
    values = prototypes[labels] + NOISE * noise
    return (128 + 48 * values).round().clamp(0, 255).to(torch.uint8), labels


def _positive(cfg: Mapping[str, Any], key: str, default: int, minimum: int = 1) -> int:
    value = int(setting(cfg, key, default))
    if value < minimum:
        raise UserError(f"dataset.{key} must be >= {minimum} for synthetic, got {value}")
    return value


@DATASETS.register("synthetic")
def build_synthetic(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int, world_size: int
) -> DataBundle:
    """Synthetic data as a resident dataset.

    Args:
        cfg: the dataset config; `num_train` (256), `num_val` (128), `num_classes` (10),
            `channels` (3), `image_size` (32), `split_seed` (0) besides the common keys.
        device: where the data lives.
        seed: trainer seed (shuffling, augmentation).
        rank: this process's rank.
        world_size: number of processes.
    """
    num_classes = _positive(cfg, "num_classes", 10, minimum=2)
    channels = _positive(cfg, "channels", 3)
    size = _positive(cfg, "image_size", 32)
    generator = torch.Generator().manual_seed(mix_seed(int(setting(cfg, "split_seed", 0))))
    grid = min(4, size)
    coarse = torch.randn((num_classes, channels, grid, grid), generator=generator)
    prototypes = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)
    train = synthetic_split(prototypes, _positive(cfg, "num_train", 256), generator)
    val = synthetic_split(prototypes, _positive(cfg, "num_val", 128), generator)
    return resident_bundle(
        cfg, device, seed, rank, world_size, train=train, test=val,
        num_classes=num_classes, mean=(MEAN,) * channels, std=(STD,) * channels,
        default_augment=DEFAULT_AUGMENT,
    )
