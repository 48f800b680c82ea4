"""`cifar10` / `cifar100`: torchvision's python-pickle release, read once and kept on the device.

The files are laid out as torchvision.datasets.CIFAR10/100 lay them out, but unpickled by
nulsq/safe_load.py, which builds numpy arrays and nothing else (torchvision would run any code a
file in dataset.root names). The whole set then goes to a TensorLoader: crop + flip run on the GPU.
`dataset.download`: auto (the default) fetches the release when its files are absent, true fetches
it whenever they are incomplete (the same thing), false never touches the network. A download is
torchvision's own (progress bar, the archive's md5 checked, unpacked) run in a temporary folder
beside `dataset.root`; only the complete folder is renamed into place, so a failed download leaves
nothing behind.
"""

from __future__ import annotations

import pickle
import shutil
import tempfile
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


def download_mode(value: Any) -> bool | str:
    """`dataset.download` as True, False or "auto"; anything else is a UserError."""
    text = str(value).strip().lower()
    if text in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[text]
    raise UserError(
        f"dataset.download={value!r} is not understood; use auto (fetch when absent), true, "
        "or false (never touch the network)"
    )


def _missing(release: CifarRelease, root: Path) -> list[str]:
    return [f for f in release.files if not (root / release.folder / f).is_file()]


def download_cifar(release: CifarRelease, root: Path) -> None:
    """torchvision's download of `release` (archive md5-checked, then unpacked) into a temporary
    folder beside `root / release.folder`, renamed into place only when complete.

    Raises:
        UserError: offline, a bad HTTP status, a broken or tampered archive; nothing is left.
    """
    tv = release.tv_class
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{release.folder}.", suffix=".download"))
    try:
        download_and_extract_archive(tv.url, str(staging), filename=tv.filename, md5=tv.tgz_md5)
        if [f for f in release.files if not (staging / release.folder / f).is_file()]:
            raise RuntimeError(f"the archive lacks {release.layout(staging)}")
        target = root / release.folder
        if not _missing(release, root):
            return  # another process (a DDP rank) put a complete copy there meanwhile
        if target.exists():  # an incomplete copy: set it aside, then swap the new one in
            target.rename(staging / "incomplete")
        (staging / release.folder).rename(target)
    except Exception as error:  # urllib's URLError (offline), HTTPError, md5 mismatch, bad archive
        raise UserError(
            f"could not download {release.title} from {release.tv_class.url} into {root} "
            f"({type(error).__name__}: {str(error).strip()[:200]}); nothing was left there; when "
            f"offline, place {release.layout(root)} there by hand and set dataset.download=false"
        ) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_cifar(
    release: CifarRelease, root: Path, download: bool | str
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train images, labels), (test images, labels)): uint8 [N, 3, 32, 32] and int64 [N].

    Args:
        release: CIFAR10 or CIFAR100.
        root: the folder holding `release.folder`.
        download: True or "auto": fetch the release when any of its files is missing; False:
            never touch the network.
    """
    missing = _missing(release, root)
    if missing and download is False:
        raise UserError(
            f"{release.title} not found: {root / release.folder / missing[0]} is missing; expected "
            f"{release.layout(root)} (torchvision's python release); set dataset.root to the "
            "folder holding it, or dataset.download=true (or auto) to fetch it when online"
        )
    if missing:
        download_cifar(release, root)
    tv = release.tv_class
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
        cfg: the dataset config; `root` (required), `download` (auto) besides the common keys.
        device: where the data lives.
        seed: trainer seed (shuffling, augmentation).
        rank: this process's rank.
        world_size: number of processes.
    """
    root = setting(cfg, "root", None)
    if root is None:
        raise UserError(
            f"dataset.root is not set; point it at the folder holding {release.layout('<root>')} "
            "(by default paths.data_dir/<dataset>, fetched there when absent)"
        )
    if int(setting(cfg, "image_size", 32)) != 32:
        raise UserError(f"dataset.image_size must be 32 (or null) for {release.title}")
    download = download_mode(setting(cfg, "download", "auto"))
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
