"""`imagenet`: an ImageFolder at `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG`.

Decoding and the standard transforms run in DataLoader workers; batches go to the device
non-blocking. Shuffling comes from a DistributedSampler (with one process it is simply a seeded
shuffle) and each sample's augmentation from a generator seeded by (seed, epoch, index), so a
batch depends only on (seed, epoch), whatever the number of workers or whether they persist.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms

from nulsq.data.augment import AugmentSpec, augment_spec
from nulsq.data.bundle import DATASETS, DataBundle, mix_seed, rank_batch_sizes, setting
from nulsq.data.split import holdout, shard_range, val_fraction
from nulsq.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
# ImageNet is never downloaded (its licence needs a login): every missing-data error says how to
# lay it out and where the steps are.
PREPARE = f"expected {LAYOUT}; ImageNet is never downloaded, see docs/imagenet.md#preparing-imagenet"


def train_transform(image_size: int, flip: bool) -> Callable:
    """RandomResizedCrop + (optional) horizontal flip + ToTensor + Normalize."""
    steps = [transforms.RandomResizedCrop(image_size)]
    steps += [transforms.RandomHorizontalFlip()] if flip else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def val_transform(image_size: int) -> Callable:
    """Resize the short side to image_size * 256/224, then CenterCrop(image_size) (224 -> 256)."""
    return transforms.Compose(
        [
            transforms.Resize(int(image_size * 256 / 224)),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


class FolderSubset(Dataset):
    """Samples `indices` of an ImageFolder, with a transform of their own.

    One scanned ImageFolder serves both sides of a `val_split` (train transform on one subset,
    val transform on the other). When `seed` is set, items are (epoch, position) pairs and the
    transform's randomness is seeded from (seed, epoch, position).

    Args:
        folder: an ImageFolder built with transform=None.
        indices: the folder's sample indices this subset exposes.
        transform: PIL image -> tensor.
        seed: trainer seed for seeded augmentation; None for a deterministic transform.
    """

    def __init__(
        self,
        folder: datasets.ImageFolder,
        indices: Sequence[int],
        transform: Callable,
        seed: int | None = None,
    ) -> None:
        self.folder, self.indices = folder, np.asarray(indices, dtype=np.int64)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, int]:
        if self.seed is None:
            image, label = self.folder[int(self.indices[item])]
            return self.transform(image), label
        epoch, position = item
        image, label = self.folder[int(self.indices[position])]
        # torchvision's random transforms draw from the global generator: fork it so the
        # process's own stream is left as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, position))
            return self.transform(image), label


class EpochTagged(Sampler):
    """Yields (epoch, index) from a DistributedSampler so workers can seed per sample, from the
    `skip`-th index on (skipped indices are never loaded: no image decoded for nothing)."""

    def __init__(self, sampler: DistributedSampler) -> None:
        self.sampler, self.epoch, self.skip = sampler, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, i) for i in itertools.islice(self.sampler, self.skip, None))

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


class FolderLoader:
    """A DataLoader that delivers batches on `device` and follows the Loader protocol.

    Args:
        loader: the DataLoader.
        device: where batches go.
        sampler: the loader's EpochTagged sampler (train) or None (val, fixed order).
    """

    def __init__(
        self, loader: DataLoader, device: torch.device, sampler: EpochTagged | None = None
    ) -> None:
        self.loader, self.device, self.sampler = loader, device, sampler

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if self.sampler is not None:
            # whole batches: the DataLoader groups consecutive indices, dropping the last few
            self.sampler.set_epoch(epoch, skip * self.loader.batch_size)

    def __len__(self) -> int:
        if self.sampler is None:
            return len(self.loader)
        return len(self.sampler.sampler) // self.loader.batch_size  # the whole epoch's

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for images, labels in self.loader:
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )


def scan_folder(path: Path) -> datasets.ImageFolder:
    """ImageFolder at `path` (transform applied later), or a UserError naming what is missing."""
    if not path.is_dir():
        raise UserError(f"ImageNet folder {path} does not exist; {PREPARE}")
    try:
        return datasets.ImageFolder(str(path))
    except FileNotFoundError as error:  # no class folders, or classes without images
        raise UserError(f"no images under {path} ({error}); {PREPARE}") from error


@DATASETS.register("imagenet")
def build_imagenet(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int, world_size: int
) -> DataBundle:
    """ImageNet (or any ImageFolder pair) streamed from disk.

    Args:
        cfg: the dataset config; `root` (required), `image_size` (224), `num_workers` (0),
            `augment.flip` (true) besides the common keys.
        device: where batches are delivered.
        seed: trainer seed (shuffling, augmentation).
        rank: this process's rank.
        world_size: number of processes.
    """
    root = setting(cfg, "root", None)
    if root is None:
        raise UserError(f"dataset.root is not set; point it at the ImageNet folder; {PREPARE}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"dataset.root {root} does not exist; {PREPARE}")
    augment = augment_spec(cfg.get("augment", None), AugmentSpec(crop_padding=0, flip=True))
    if augment.crop_padding:
        raise UserError(
            "dataset.augment.crop_padding does not apply to imagenet (it uses RandomResizedCrop); "
            "set it to 0 or null"
        )
    image_size = int(setting(cfg, "image_size", 224))

    folder = scan_folder(root / "train")
    if val_fraction(cfg) > 0:
        kept, held = holdout(np.asarray(folder.targets), cfg)
        val_set = FolderSubset(folder, held, val_transform(image_size))
    else:
        val_folder = scan_folder(root / "val")
        if val_folder.classes != folder.classes:
            raise UserError(
                f"{root / 'val'} and {root / 'train'} hold different class folders; "
                f"expected the same <class> names in both ({LAYOUT})"
            )
        kept = np.arange(len(folder))
        val_set = FolderSubset(val_folder, np.arange(len(val_folder)), val_transform(image_size))
    train_set = FolderSubset(folder, kept, train_transform(image_size, augment.flip), seed)
    batch_size, eval_batch_size = rank_batch_sizes(cfg, len(train_set), world_size)

    workers = int(setting(cfg, "num_workers", 0))
    common = dict(
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
    )
    # Hashing the seed keeps DistributedSampler's seed + epoch from colliding across seeds.
    sampler = EpochTagged(
        DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True, seed=mix_seed(seed),
            drop_last=True,
        )
    )
    start, stop = shard_range(len(val_set), rank, world_size)
    return DataBundle(
        train=FolderLoader(
            DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, **common),
            device,
            sampler,
        ),
        val=FolderLoader(
            DataLoader(val_set, eval_batch_size, sampler=range(start, stop), **common), device
        ),
        num_classes=len(folder.classes),
        image_size=image_size,
        train_size=len(train_set),
        val_size=len(val_set),
    )
