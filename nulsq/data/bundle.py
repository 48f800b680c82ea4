"""What a dataset builder hands the trainer, how builders are found, and the `dataset.*` keys
every builder reads the same way (batch sizes, seeds).

A builder is registered under the name a user types (`dataset=cifar10` -> `dataset.name: cifar10`)
and has the signature `builder(cfg, device, seed, rank, world_size) -> DataBundle`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from nulsq.errors import UserError
from nulsq.registry import Registry


@runtime_checkable
class Loader(Protocol):
    """One split as batches of (images float32 [B,C,H,W], labels int64 [B]) on the device."""

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]: ...

    def __len__(self) -> int:
        """Batches per epoch for this rank."""
        ...

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch; order and augmentation depend only on (seed, epoch). The next pass
        starts after the epoch's first `skip` batches (those a resumed run has done), without
        producing them: the rest are the batches an uninterrupted epoch would give."""
        ...


@dataclass
class DataBundle:
    """The train and val loaders of one dataset plus the sizes the trainer needs.

    Args:
        train: shuffled, augmented, drops the last incomplete global batch.
        val: fixed order, no augmentation, every sample exactly once over all ranks.
        num_classes: number of labels (labels lie in [0, num_classes)).
        image_size: height = width of the images the loaders yield.
        train_size: samples in the train split (after `val_split`).
        val_size: samples in the val split, all ranks together.
    """

    train: Loader
    val: Loader
    num_classes: int
    image_size: int
    train_size: int
    val_size: int


Builder = Callable[[Any, torch.device, int, int, int], DataBundle]
DATASETS: Registry[Builder] = Registry("dataset")


def build(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int = 0, world_size: int = 1
) -> DataBundle:
    """Build the dataset named by `cfg.name`.

    Args:
        cfg: the `dataset` config group (a DictConfig or a plain mapping).
        device: where batches are delivered (and where resident datasets live).
        seed: the trainer seed; it drives shuffling and augmentation, never the splits.
        rank: this process's rank under DDP.
        world_size: number of DDP processes.
    """
    name = setting(cfg, "name", None)
    if name is None:
        raise UserError(f"dataset.name is not set; valid names: {', '.join(DATASETS.names())}")
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside world_size {world_size}; launch with torchrun")
    return DATASETS.get(str(name))(cfg, torch.device(device), seed, rank, world_size)


def setting(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    """`cfg[key]`, or `default` when the key is absent or null (null means "dataset default")."""
    value = cfg.get(key, None)
    return default if value is None else value


def rank_batch_sizes(cfg: Mapping[str, Any], train_size: int, world_size: int) -> tuple[int, int]:
    """Per-rank (train, eval) batch sizes from the GLOBAL `batch_size` and `eval_batch_size`.

    Args:
        cfg: the dataset config.
        train_size: samples in the train split, to reject a batch that no epoch could fill.
        world_size: number of DDP processes.
    """
    batch_size = int(setting(cfg, "batch_size", 0))
    if batch_size <= 0:
        raise UserError(f"dataset.batch_size must be a positive integer, got {batch_size}")
    if batch_size > train_size:
        raise UserError(
            f"dataset.batch_size={batch_size} is larger than the train split "
            f"({train_size} samples); lower dataset.batch_size"
        )
    if batch_size % world_size:
        raise UserError(
            f"dataset.batch_size={batch_size} (global) is not divisible by "
            f"world_size={world_size}; choose a multiple of the number of processes"
        )
    eval_batch_size = int(setting(cfg, "eval_batch_size", batch_size))
    if eval_batch_size <= 0:
        raise UserError(
            f"dataset.eval_batch_size must be a positive integer, got {eval_batch_size}"
        )
    # Eval needs no equal shards (no gradients are averaged), so round up instead of refusing.
    return batch_size // world_size, math.ceil(eval_batch_size / world_size)


def mix_seed(*parts: int) -> int:
    """One 63-bit seed from several integers, e.g. (trainer seed, epoch).

    SeedSequence hashes the parts, so nearby inputs such as (0, 1) and (1, 0) give unrelated seeds.
    """
    words = [int(p) % 2**64 for p in parts]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
