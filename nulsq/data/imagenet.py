"""`imagenet`: an ImageFolder at `<root>/train/<class>/*.JPEG` and `<root>/val/<class>/*.JPEG`.

Two loaders read it (`dataset.loader`): `torchvision` decodes with PIL and runs the standard
transforms in DataLoader workers, batches going to the device non-blocking; `dali` (nulsq/data/
dali.py) decodes with NVIDIA DALI, on the GPU when there is one. `auto` takes DALI on CUDA when it
is installed. Both shuffle with a DistributedSampler (with one process it is simply a seeded
shuffle) and draw each sample's crop and flip from a generator seeded by (seed, epoch, index), so
a batch depends only on (seed, epoch), whatever the loader, the number of workers or whether they
persist.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchvision import datasets, transforms
from torchvision.transforms import InterpolationMode

from nulsq.config import ImageLoader
from nulsq.data.augment import AugmentSpec, augment_spec
from nulsq.data.bundle import DATASETS, DataBundle, mix_seed, rank_batch_sizes, setting
from nulsq.data.split import holdout, shard_range, val_fraction
from nulsq.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = (0.08, 1.0)  # RandomResizedCrop's area fraction range
RATIO = (3 / 4, 4 / 3)  # and aspect ratio range
INTERPOLATION = InterpolationMode.BILINEAR  # with antialiasing (PIL's resize always has it)
LAYOUT = "<root>/train/<class>/*.JPEG and <root>/val/<class>/*.JPEG"
# The schema's list: a bad value in a config is refused while composing; one given another way (a
# plain mapping to `nulsq.data.build`, scripts/bench_loader.py's --loaders) by `check_loader`.
LOADERS = ImageLoader.values()
DALI_INSTALL = "pip install -e '.[dali]' (NVIDIA DALI for CUDA 13)"
CHECK = "python scripts/check_imagenet.py <dataset.root> lists every unreadable file"
# ImageNet is never downloaded (its licence needs a login): every missing-data error says how to
# lay it out and where the steps are.
PREPARE = f"expected {LAYOUT}; ImageNet is never downloaded, see docs/imagenet.md#preparing-imagenet"


def train_transform(image_size: int, flip: bool) -> Callable:
    """RandomResizedCrop + (optional) horizontal flip + ToTensor + Normalize."""
    steps = [transforms.RandomResizedCrop(image_size, SCALE, RATIO, INTERPOLATION)]
    steps += [transforms.RandomHorizontalFlip()] if flip else []
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(MEAN, STD)])


def draw_crop(image: Image.Image, flip: bool) -> tuple[int, int, int, int, bool]:
    """(top, left, height, width, flipped) drawn from the global generator exactly as
    train_transform draws them (the crop window first, then the flip coin), for loaders that
    apply the crop themselves (DALI). Only the image's size is read: no decoding."""
    top, left, height, width = transforms.RandomResizedCrop.get_params(image, SCALE, RATIO)
    return top, left, height, width, bool(flip and torch.rand(1) < 0.5)


@contextlib.contextmanager
def seeded(seed: int, epoch: int, position: int) -> Iterator[None]:
    """Seed the global torch generator from (seed, epoch, position) inside the block, leaving the
    process's own stream as it was (torchvision's random transforms draw from the global one)."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: that is the one transforms draw from, and torch.manual_seed
        # would also reseed every CUDA generator (and costs ~1 ms, per sample).
        torch.default_generator.manual_seed(mix_seed(seed, epoch, position))
        yield


def val_resize(image_size: int) -> int:
    """The short side the val transform resizes to before the center crop (224 -> 256)."""
    return int(image_size * 256 / 224)


def val_transform(image_size: int) -> Callable:
    """Resize the short side to image_size * 256/224, then CenterCrop(image_size) (224 -> 256)."""
    return transforms.Compose(
        [
            transforms.Resize(val_resize(image_size), INTERPOLATION),
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
        with seeded(self.seed, epoch, position):
            return self.transform(image), label

    def path(self, position: int) -> str:
        return self.folder.samples[int(self.indices[position])][0]


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
        batches = iter(self.loader)
        for index in itertools.count():
            try:
                images, labels = next(batches)
            except StopIteration:
                return
            except Exception as error:  # a worker's error arrives as its whole traceback
                raise self._explain(error, index) from error
            yield (
                images.to(self.device, non_blocking=True),
                labels.to(self.device, non_blocking=True),
            )

    def _explain(self, error: Exception, index: int) -> Exception:
        """A one-line UserError naming the unreadable file of batch `index` (batches arrive in
        order), or `error` itself when every file of that batch decodes."""
        batch = next(itertools.islice(iter(self.loader.batch_sampler), index, None), [])
        positions = [item[1] if isinstance(item, tuple) else item for item in batch]
        bad = first_unreadable([self.loader.dataset.path(p) for p in positions])
        return error if bad is None else UserError(f"cannot decode image {bad[0]}: {bad[1]}; {CHECK}")


def unreadable(path: str | Path, draft: bool = False) -> str | None:
    """Why the image at `path` cannot be decoded as the loaders decode it, or None if it can.

    draft: decode JPEGs at 1/8 scale (DCT scaling still reads every coefficient, so truncated or
        corrupt data fails just the same, several times faster).
    """
    try:
        with Image.open(path) as image:
            if draft:
                image.draft("RGB", (1, 1))
            image.convert("RGB")  # decodes every pixel: a truncated file fails here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return str(error) or type(error).__name__
    return None


def first_unreadable(paths: Sequence[str]) -> tuple[str, str] | None:
    """(path, reason) of the first file of `paths` that cannot be decoded, or None."""
    for path in paths:
        reason = unreadable(path)
        if reason is not None:
            return path, reason
    return None


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
            `augment.flip` (true), `loader` (auto | dali | torchvision) besides the common keys.
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
    if choose_loader(cfg, device, say=rank == 0) == "dali":
        from nulsq.data.dali import dali_loaders  # DALI is an optional extra

        train, val = dali_loaders(
            train_set, val_set, batch_size=batch_size,
            eval_batch_size=eval_batch_size, image_size=image_size, flip=augment.flip, seed=seed,
            rank=rank, world_size=world_size, device=device, workers=workers,
        )
    else:
        train, val = folder_loaders(
            train_set, val_set, batch_size, eval_batch_size, device, rank, world_size, workers
        )
    return DataBundle(
        train=train,
        val=val,
        num_classes=len(folder.classes),
        image_size=image_size,
        train_size=len(train_set),
        val_size=len(val_set),
    )


def folder_loaders(
    train_set: FolderSubset,
    val_set: FolderSubset,
    batch_size: int,
    eval_batch_size: int,
    device: torch.device,
    rank: int,
    world_size: int,
    workers: int,
) -> tuple[FolderLoader, FolderLoader]:
    """(train, val) FolderLoaders: torchvision transforms in `workers` DataLoader processes."""
    common = dict(
        num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0
    )
    # Hashing the seed keeps DistributedSampler's seed + epoch from colliding across seeds.
    sampler = EpochTagged(
        DistributedSampler(
            train_set, num_replicas=world_size, rank=rank, shuffle=True,
            seed=mix_seed(train_set.seed), drop_last=True,
        )
    )
    start, stop = shard_range(len(val_set), rank, world_size)
    return (
        FolderLoader(
            DataLoader(train_set, batch_size, sampler=sampler, drop_last=True, **common),
            device,
            sampler,
        ),
        FolderLoader(
            DataLoader(val_set, eval_batch_size, sampler=range(start, stop), **common), device
        ),
    )


def dali_installed() -> bool:
    """Whether NVIDIA DALI can be imported (looked up without importing it)."""
    try:
        return importlib.util.find_spec("nvidia.dali") is not None
    except (ImportError, ValueError):  # no `nvidia` package at all, or a broken entry
        return False


def check_loader(name: str) -> str:
    """`name` if it is a `dataset.loader` value, else a one-line UserError listing the valid ones
    (the only check outside the schema: every caller goes through it)."""
    name = str(name)
    if name not in LOADERS:
        raise UserError(f"unknown dataset.loader '{name}'; valid: {', '.join(LOADERS)}")
    return name


def choose_loader(cfg: Mapping[str, Any], device: torch.device, say: bool = True) -> str:
    """`dataset.loader` resolved: auto takes DALI on CUDA when it is installed, else torchvision,
    saying in one line (when `say`: rank 0) how to install DALI if the GPU would have used it."""
    loader = check_loader(setting(cfg, "loader", "auto"))
    if loader == "dali" and not dali_installed():
        raise UserError(f"dataset.loader=dali needs NVIDIA DALI; install it with {DALI_INSTALL}")
    if loader != "auto":
        return loader
    if device.type != "cuda":
        return "torchvision"
    if dali_installed():
        return "dali"
    if say:
        print(
            "dataset.loader=auto: NVIDIA DALI is not installed, decoding ImageNet with torchvision "
            f"on the CPU (slower); for GPU decoding: {DALI_INSTALL}",
            flush=True,
        )
    return "torchvision"
