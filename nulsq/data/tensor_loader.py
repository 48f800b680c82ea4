"""A loader for datasets that fit in device memory (CIFAR, digits, synthetic).

The whole split lives on the device as one tensor (uint8 for real images). Every epoch draws, on
the device, a permutation plus augmentation parameters for every position in it, from a generator
seeded by (seed, epoch); a batch is then an index_select, one gather (augment.crop_flip) and a fused
normalise. The same code runs on CPU and CUDA, so the CPU tests exercise the GPU path.

DDP: every rank draws the same permutation and parameters and takes its slice of each global batch,
so the global batch (and its augmentation) does not depend on the number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from nulsq.data.augment import AugmentSpec, augment_spec, crop_flip
from nulsq.data.bundle import DataBundle, mix_seed, rank_batch_sizes
from nulsq.data.split import holdout, shard_range, val_fraction


class TensorLoader:
    """Batches of one resident split.

    Args:
        images: [N, C, H, W] uint8 (0..255) or float (0..1), already on the target device.
        labels: [N] int64 on the same device.
        batch_size: per-rank batch size.
        train: True shuffles, augments and drops the last incomplete global batch; False walks
            this rank's contiguous shard in order, last batch possibly short.
        seed: trainer seed (with the epoch it fixes order and augmentation).
        mean: per-channel mean of the 0..1 images.
        std: per-channel std of the 0..1 images.
        augment: augmentation for train (ignored when train is False).
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        mean: Sequence[float],
        std: Sequence[float],
        augment: AugmentSpec = AugmentSpec(),
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.augment = augment if train else AugmentSpec()
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0
        # x_norm = (x / range - mean) / std folded into x * scale + bias, one pass per batch.
        value_range = 255.0 if images.dtype == torch.uint8 else 1.0
        std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
        self.scale = 1.0 / (value_range * std_t)
        self.bias = -mean_t / std_t

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        n = len(self.labels)
        if self.train:
            return n // (self.batch_size * self.world_size)
        start, stop = shard_range(n, self.rank, self.world_size)
        return math.ceil((stop - start) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return self._train_batches() if self.train else self._val_batches()

    def _train_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = len(self.labels)
        generator = torch.Generator(device=self.images.device)
        generator.manual_seed(mix_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=generator, device=self.images.device)
        offsets, flips = self.augment.draw(n, generator)
        global_batch = self.batch_size * self.world_size
        for i in range(self.skip, len(self)):
            start = i * global_batch + self.rank * self.batch_size
            part = slice(start, start + self.batch_size)
            images = self.images.index_select(0, order[part])
            if self.augment.active:
                images = crop_flip(images, offsets[part], flips[part], self.augment.crop_padding)
            yield self._normalise(images), self.labels.index_select(0, order[part])

    def _val_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, stop = shard_range(len(self.labels), self.rank, self.world_size)
        for first in range(start, stop, self.batch_size):
            last = min(first + self.batch_size, stop)
            yield self._normalise(self.images[first:last]), self.labels[first:last]

    def _normalise(self, images: Tensor) -> Tensor:
        # Out-of-place first: a float dataset must not be changed in place through a slice view.
        return images.mul(self.scale).add_(self.bias).contiguous()


def resident_bundle(
    cfg: Mapping[str, Any],
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
    *,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    default_augment: AugmentSpec,
) -> DataBundle:
    """Turn a dataset's CPU tensors into a DataBundle of TensorLoaders on `device`.

    Applies `dataset.val_split` (hold out part of train; the official test set is then unused),
    the batch-size checks and `dataset.augment`.

    Args:
        cfg: the dataset config.
        device: where the tensors live and batches are made.
        seed: trainer seed.
        rank: this process's rank.
        world_size: number of processes.
        train: (images [N,C,H,W] uint8 or float, labels [N] int64) of the official train set.
        test: the same for the official test/val set.
        num_classes: number of labels.
        mean: per-channel mean of the 0..1 images.
        std: per-channel std of the 0..1 images.
        default_augment: augmentation when `dataset.augment` is null.
    """
    train_x, train_y = train
    val_x, val_y = test
    if val_fraction(cfg) > 0:
        kept, held = holdout(train_y.numpy(), cfg)
        kept_t, held_t = torch.from_numpy(kept), torch.from_numpy(held)
        val_x, val_y = train_x[held_t], train_y[held_t]
        train_x, train_y = train_x[kept_t], train_y[kept_t]
    batch_size, eval_batch_size = rank_batch_sizes(cfg, len(train_y), world_size)
    augment = augment_spec(cfg.get("augment", None), default_augment)

    def on_device(images: Tensor, labels: Tensor, **kwargs: Any) -> TensorLoader:
        images, labels = images.to(device), labels.to(device, torch.int64)
        return TensorLoader(
            images, labels, seed=seed, mean=mean, std=std, rank=rank, world_size=world_size,
            **kwargs,
        )

    return DataBundle(
        train=on_device(train_x, train_y, batch_size=batch_size, train=True, augment=augment),
        val=on_device(val_x, val_y, batch_size=eval_batch_size, train=False),
        num_classes=num_classes,
        image_size=int(train_x.shape[-1]),
        train_size=len(train_y),
        val_size=len(val_y),
    )
