"""`cifar10` / `cifar100`: torchvision's python-pickle release, read once and kept on the device.

The files are laid out and downloaded (`dataset.download=true`) as torchvision.datasets.CIFAR10/100
do it, but unpickled by nulsq/safe_load.py, which builds numpy arrays and nothing else (torchvision
would run any code a file in dataset.root names). The whole set then goes to a TensorLoader: crop +
flip run on the GPU.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.utils import download_and_extract_archive

from nulsq.data.augment import AugmentSpec
from nulsq.data.bundle import DATASETS, DataBundle, setting
from nulsq.data.tensor_loader import resident_bundle
from nulsq.errors import UserError
from nulsq.safe_load import load_numpy_pickle

# The normalisation pytorchcv's pretrained CIFAR-10/100 models were trained with (imgclsmob's
# cifar10_cls_dataset.py, used for both sets) and the nuLSQ authors' loaders copy; the FP
# accuracies the paper starts from (93.49 / 95.51) hold only with these values.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)
DEFAULT_AUGMENT = AugmentSpec(crop_padding=4, flip=True)


@dataclass(frozen=True)
class CifarRelease:
    """One CIFAR release as torchvision lays it out under `dataset.root`."""

    title: str
    tv_class: type[datasets.CIFAR10]
    num_classes: int

    @property
    def folder(self) -> str:
        return self.tv_class.base_folder

    @property
    def files(self) -> list[str]:
        lists = self.tv_class.train_list + self.tv_class.test_list
        return [name for name, _ in lists] + [self.tv_class.meta["filename"]]

    def layout(self, root: Path | str) -> str:
        return f"{Path(root) / self.folder}/{{{','.join(self.files)}}}"


CIFAR10 = CifarRelease("CIFAR-10", datasets.CIFAR10, 10)
CIFAR100 = CifarRelease("CIFAR-100", datasets.CIFAR100, 100)


def _read_split(release: CifarRelease, folder: Path, files: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The images (uint8 [N, 3, 32, 32]) and labels of `files`, in order, as torchvision reads
    them, but unpickled with numpy arrays and plain values allowed only (a crafted file in
    dataset.root cannot run code)."""
    entries = [load_numpy_pickle(folder / name, f"{release.title} file") for name in files]
    data = np.vstack([entry["data"] for entry in entries]).reshape(-1, 3, 32, 32)
    labels = [label for entry in entries for label in entry.get("labels", entry.get("fine_labels"))]
    return torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels)


def read_cifar(
    release: CifarRelease, root: Path, download: bool
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)): uint8 [N, 3, 32, 32] and int64 [N].

    Args:
        release: CIFAR10 or CIFAR100.
        root: the folder holding `release.folder`.
        download: let torchvision fetch the archive (md5-verified) when files are missing.
    """
    missing = [f for f in release.files if not (root / release.folder / f).is_file()]
    if missing and not download:
        raise UserError(
            f"{release.title} not found: {root / release.folder / missing[0]} is missing; expected "
            f"{release.layout(root)} (torchvision's python release); set dataset.root to the "
            "folder holding it, or add dataset.download=true to fetch it when online"
        )
    tv = release.tv_class
    try:
        if missing:
            download_and_extract_archive(tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5)
    except (OSError, RuntimeError) as error:  # urllib's URLError (offline) is an OSError
        raise UserError(
            f"could not download {release.title} at {root}: {error}; when offline, place "
            f"{release.layout(root)} there by hand"
        ) from error
    folder = root / release.folder
    try:
        return tuple(_read_split(release, folder, [name for name, _ in files])
                     for files in (tv.train_list, tv.test_list))
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError, OSError) as error:
        raise UserError(
            f"could not read {release.title} under {folder}: {error!r}; expected "
            f"torchvision's python release ({release.layout(root)}); delete it and re-download"
        ) from error


def build_cifar(
    release: CifarRelease,
    cfg: Mapping[str, Any],
    device: torch.device,
    seed: int,
    rank: int,
    world_size: int,
) -> DataBundle:
    """A CIFAR release as a resident dataset.

    Args:
        release: CIFAR10 or CIFAR100.
        cfg: the dataset config; `root` (required), `download` (false) besides the common keys.
        device: where the data lives.
        seed: trainer seed (shuffling, augmentation).
        rank: this process's rank.
        world_size: number of processes.
    """
    root = setting(cfg, "root", None)
    if root is None:
        raise UserError(
            f"dataset.root is not set; point it at the folder holding {release.layout('<root>')}, "
            "or add dataset.download=true to fetch it there when online"
        )
    if int(setting(cfg, "image_size", 32)) != 32:
        raise UserError(f"dataset.image_size must be 32 (or null) for {release.title}")
    download = bool(setting(cfg, "download", False))
    train, test = read_cifar(release, Path(root).expanduser(), download)
    return resident_bundle(
        cfg, device, seed, rank, world_size, train=train, test=test,
        num_classes=release.num_classes, mean=MEAN, std=STD, default_augment=DEFAULT_AUGMENT,
    )


@DATASETS.register("cifar10")
def build_cifar10(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int, world_size: int
) -> DataBundle:
    """CIFAR-10 (50k train / 10k test, 10 classes); arguments as in `build_cifar`."""
    return build_cifar(CIFAR10, cfg, device, seed, rank, world_size)


@DATASETS.register("cifar100")
def build_cifar100(
    cfg: Mapping[str, Any], device: torch.device, seed: int, rank: int, world_size: int
) -> DataBundle:
    """CIFAR-100 (50k train / 10k test, 100 fine classes); arguments as in `build_cifar`."""
    return build_cifar(CIFAR100, cfg, device, seed, rank, world_size)
