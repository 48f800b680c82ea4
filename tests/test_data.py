"""Datasets and loaders (nulsq.data): shapes, determinism, DDP sharding, splits, augmentation,
the CIFAR and ImageFolder readers on tiny files written here, and the user-facing errors."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_digits

from nulsq.data import DATASETS, DataBundle, Loader, build, cifar, digits, synthetic
from nulsq.data.augment import AugmentSpec, crop_flip
from nulsq.data.split import shard_range, stratified_split
from nulsq.data.tensor_loader import TensorLoader
from nulsq.errors import UserError

CPU = torch.device("cpu")


def make_cfg(**overrides) -> OmegaConf:
    """A struct-mode dataset config, as Hydra hands it over (small synthetic by default)."""
    base = dict(
        name="synthetic", root=None, batch_size=16, eval_batch_size=None, val_split=0,
        split_seed=0, num_workers=0, download=False, image_size=12, augment=None,
        num_train=96, num_val=37, num_classes=4, channels=3,
    )
    cfg = OmegaConf.create({**base, **overrides})
    OmegaConf.set_struct(cfg, True)
    return cfg


def epoch(loader: Loader, number: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number)
    return list(loader)


def to_uint8(x: torch.Tensor, mean, std) -> np.ndarray:
    """Undo the normalisation: back to the 0..255 pixel values (float64 arithmetic)."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (x.double() * s + m).mul(255).round().numpy()


def fingerprints(batches, mean, std) -> list[str]:
    """A hash per image, to compare sample sets across loaders."""
    images = np.concatenate([to_uint8(x, mean, std) for x, _ in batches]).astype(np.uint8)
    return [hashlib.sha1(img.tobytes()).hexdigest() for img in images]


# --- tiny copies of the real on-disk formats ------------------------------------------------------


class _Py2Str(bytes):
    """A Python 2 `str`: the original CIFAR pickles store their keys with this opcode."""


class _Py2Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2str(self, obj: _Py2Str) -> None:
        self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + bytes(obj))
        self.memoize(obj)

    dispatch[_Py2Str] = _save_py2str


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(entry)


def write_cifar(root: Path, fine: bool, per_file: int = 4) -> dict[str, tuple[np.ndarray, list]]:
    """Write a CIFAR release in torchvision's python format with a few images per file.

    Returns the (data [n, 3072] uint8, labels) written per file name.
    """
    release = cifar.CIFAR100 if fine else cifar.CIFAR10
    folder = root / release.folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label_key = _Py2Str(b"fine_labels" if fine else b"labels")
    written = {}
    for name, _ in release.tv_class.train_list + release.tv_class.test_list:
        n = per_file * (5 if fine and name == "train" else 1)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, release.num_classes, n)]
        _dump(folder / name, {_Py2Str(b"batch_label"): _Py2Str(name.encode()),
                              label_key: labels, _Py2Str(b"data"): data})
        written[name] = (data, labels)
    names = [_Py2Str(f"class{i}".encode()) for i in range(release.num_classes)]
    meta_key = _Py2Str(release.tv_class.meta["key"].encode())
    _dump(folder / release.tv_class.meta["filename"], {meta_key: names})
    return written


def write_image_folder(root: Path, classes=("n001", "n002", "n003"), train=4, val=3) -> None:
    """<root>/{train,val}/<class>/*.JPEG (and a PNG) of assorted sizes."""
    rng = np.random.default_rng(1)
    for split, count in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                h, w = rng.integers(30, 60, 2)
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                suffix = ".png" if i == 0 else ".JPEG"
                Image.fromarray(pixels).save(root / split / c / f"img{i}{suffix}")


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar(tmp_path, fine=False)
    write_cifar(tmp_path, fine=True)
    return tmp_path


@pytest.fixture
def imagenet_root(tmp_path: Path) -> Path:
    write_image_folder(tmp_path / "imagenet")
    return tmp_path / "imagenet"


def cfg_for(name: str, tmp_path: Path) -> tuple[OmegaConf, int, int, int]:
    """(config, classes, train size, val size) of a tiny instance of each registered dataset."""
    if name == "digits":
        return make_cfg(name="digits", image_size=None, batch_size=100), 10, 1438, 359
    if name == "synthetic":
        return make_cfg(), 4, 96, 37
    if name in ("cifar10", "cifar100"):
        write_cifar(tmp_path, fine=name == "cifar100")
        classes = 100 if name == "cifar100" else 10
        return cifar_cfg(name, tmp_path, batch_size=8), classes, 20, 4
    if name == "imagenet":
        write_image_folder(tmp_path / "in")
        return make_cfg(name=name, root=str(tmp_path / "in"), image_size=32, batch_size=4), 3, 12, 9
    raise AssertionError(f"no test instance for dataset {name}; add one to cfg_for")


# --- every dataset --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_yields_batches_of_the_contract(name: str, tmp_path: Path) -> None:
    cfg, classes, train_size, val_size = cfg_for(name, tmp_path)
    bundle = build(cfg, CPU, seed=0)
    assert isinstance(bundle, DataBundle)
    assert isinstance(bundle.train, Loader) and isinstance(bundle.val, Loader)
    sizes = (bundle.num_classes, bundle.train_size, bundle.val_size)
    assert sizes == (classes, train_size, val_size)
    size = bundle.image_size
    assert size == (32 if name != "synthetic" else 12)

    train = epoch(bundle.train)
    assert len(train) == len(bundle.train) == train_size // cfg.batch_size
    for x, y in train:
        assert x.shape == (cfg.batch_size, 3, size, size) and x.dtype == torch.float32
        assert x.is_contiguous() and y.shape == (cfg.batch_size,) and y.dtype == torch.int64
        assert 0 <= int(y.min()) and int(y.max()) < classes and torch.isfinite(x).all()

    val = epoch(bundle.val)
    assert len(val) == len(bundle.val) == -(-val_size // cfg.batch_size)
    assert sum(len(y) for _, y in val) == val_size
    assert all(x.shape[1:] == (3, size, size) and x.dtype == torch.float32 for x, _ in val)
    assert all(y.dtype == torch.int64 and int(y.max()) < classes for _, y in val)


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(UserError, match="cifar10, cifar100, digits, imagenet, synthetic"):
        build(make_cfg(name="mnist"), CPU, seed=0)


# --- digits ---------------------------------------------------------------------------------------


def test_digits_split_is_stratified_80_20_and_independent_of_trainer_seed() -> None:
    cfg = make_cfg(name="digits", image_size=None, batch_size=64)
    first, second = build(cfg, CPU, seed=0), build(cfg, CPU, seed=123)
    val_a, val_b = epoch(first.val), epoch(second.val)
    for (xa, ya), (xb, yb) in zip(val_a, val_b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)

    counts = np.bincount(load_digits().target, minlength=10)
    held = np.bincount(torch.cat([y for _, y in val_a]).numpy(), minlength=10)
    assert held.sum() == round(0.2 * counts.sum())
    assert np.all((held == np.floor(0.2 * counts)) | (held == np.ceil(0.2 * counts)))
    # Another split seed draws another test set.
    other = epoch(build(make_cfg(name="digits", batch_size=64, split_seed=1), CPU, seed=0).val)
    assert not torch.equal(val_a[0][0], other[0][0])


def test_digits_images_are_bilinear_upsampled_scans_on_three_channels() -> None:
    images, labels = digits.digit_images(32)
    scans = load_digits()
    assert images.dtype == torch.uint8 and images.shape == (1797, 3, 32, 32)
    assert torch.equal(labels, torch.from_numpy(scans.target))
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    # float64 reference of half-pixel-centred bilinear upsampling, from its definition.
    src = np.clip((np.arange(32) + 0.5) * 8 / 32 - 0.5, 0, 7)
    lo = np.floor(src).astype(int)
    hi, frac = np.minimum(lo + 1, 7), src - np.floor(src)
    for i in (0, 5, 1796):
        scan = scans.images[i] * 255 / 16
        rows = scan[lo] * (1 - frac)[:, None] + scan[hi] * frac[:, None]
        ref = rows[:, lo] * (1 - frac) + rows[:, hi] * frac
        assert np.abs(images[i, 0].numpy() - ref).max() <= 0.5 + 1e-6


# --- determinism and sharding ---------------------------------------------------------------------


def test_same_seed_and_epoch_give_identical_batches_other_epochs_differ() -> None:
    cfg = make_cfg(augment={"crop_padding": 2, "flip": True})
    a, b = build(cfg, CPU, seed=7).train, build(cfg, CPU, seed=7).train
    for (xa, ya), (xb, yb) in zip(epoch(a, 3), epoch(b, 3), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    again = epoch(a, 3)  # set_epoch back to an epoch replays it
    assert torch.equal(again[0][0], epoch(b, 3)[0][0])
    assert not torch.equal(epoch(a, 3)[0][1], epoch(a, 4)[0][1])
    assert not torch.equal(epoch(a, 3)[0][0], epoch(build(cfg, CPU, seed=8).train, 3)[0][0])


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_split_each_global_batch_and_the_val_set_exactly_once(world_size: int) -> None:
    cfg = make_cfg(augment={"crop_padding": 2, "flip": True})
    single = build(cfg, CPU, seed=1)
    ranks = [build(cfg, CPU, seed=1, rank=r, world_size=world_size) for r in range(world_size)]
    per_rank = [epoch(b.train, 2) for b in ranks]
    whole = epoch(single.train, 2)
    assert all(len(b.train) == len(single.train) == len(whole) for b in ranks)
    for i, (x, y) in enumerate(whole):
        parts = [batches[i] for batches in per_rank]
        assert all(len(py) == cfg.batch_size // world_size for _, py in parts)
        # Same images, same augmentation, in rank order: the global batch does not depend on
        # the number of processes.
        assert torch.equal(torch.cat([px for px, _ in parts]), x)
        assert torch.equal(torch.cat([py for _, py in parts]), y)

    val_parts = [epoch(b.val) for b in ranks]
    mean, std = (synthetic.MEAN,) * 3, (synthetic.STD,) * 3
    seen = [h for part in val_parts for h in fingerprints(part, mean, std)]
    assert len(seen) == 37 and sorted(seen) == sorted(fingerprints(epoch(single.val), mean, std))
    assert sum(len(b.val) for b in ranks) >= len(single.val)


def test_shard_range_partitions_with_near_equal_shards() -> None:
    for n, w in [(37, 2), (10, 4), (3, 4), (0, 2)]:
        bounds = [shard_range(n, r, w) for r in range(w)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(bounds[r][1] == bounds[r + 1][0] for r in range(w - 1))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


# --- val_split ------------------------------------------------------------------------------------


def test_val_split_holds_out_a_disjoint_stratified_tenth_of_train() -> None:
    plain = make_cfg(num_train=200, batch_size=20, augment={"crop_padding": 0, "flip": False})
    split = make_cfg(num_train=200, batch_size=20, val_split=0.1,
                     augment={"crop_padding": 0, "flip": False})
    mean, std = (synthetic.MEAN,) * 3, (synthetic.STD,) * 3
    everything = fingerprints(epoch(build(plain, CPU, seed=0).train), mean, std)
    bundle = build(split, CPU, seed=0)
    assert (bundle.train_size, bundle.val_size) == (180, 20)
    train = fingerprints(epoch(bundle.train), mean, std)
    val_batches = epoch(bundle.val)
    val = fingerprints(val_batches, mean, std)
    assert len(set(train)) == 180 and len(set(val)) == 20 and not set(train) & set(val)
    assert set(train) | set(val) == set(everything)
    # 200 balanced samples of 4 classes: 5 of each class held out.
    assert np.bincount(torch.cat([y for _, y in val_batches]).numpy()).tolist() == [5] * 4
    # Fixed by split_seed, not by the trainer seed.
    assert fingerprints(epoch(build(split, CPU, seed=9).val), mean, std) == val


def test_stratified_split_apportions_the_total_by_largest_remainder() -> None:
    labels = np.repeat(np.arange(3), [7, 5, 3])
    kept, held = stratified_split(labels, 0.3, seed=4, purpose="val")
    # 0.3 * 15 = 4.5 -> 5 held; quotas 2.1, 1.5, 0.9 -> floors 2, 1, 0 and the two extra go to
    # the largest remainders (0.9 then 0.5).
    assert np.bincount(labels[held]).tolist() == [2, 2, 1]
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(15))
    again, _ = stratified_split(labels, 0.3, seed=4, purpose="val")
    other = [stratified_split(labels, 0.3, seed=4, purpose="test")[1] for _ in range(1)][0]
    assert np.array_equal(kept, again) and not np.array_equal(held, other)


# --- augmentation ---------------------------------------------------------------------------------


def numpy_crop_flip(img: np.ndarray, dy: int, dx: int, flip: bool, pad: int) -> np.ndarray:
    """Reference: pad with zeros, slice, mirror (one image, written from the definition)."""
    c, h, w = img.shape
    padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)))
    out = padded[:, dy:dy + h, dx:dx + w]
    return out[:, :, ::-1] if flip else out


def test_crop_flip_matches_pad_slice_mirror_reference() -> None:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(1, 256, (64, 2, 5, 7), dtype=np.uint8))
    offsets = torch.from_numpy(rng.integers(0, 7, (64, 2)))
    flips = torch.from_numpy(rng.random(64) < 0.5)
    out = crop_flip(images, offsets, flips, padding=3)
    assert out.shape == images.shape and out.dtype == torch.uint8 and out.is_contiguous()
    for i in range(64):
        dy, dx = offsets[i].tolist()
        ref = numpy_crop_flip(images[i].numpy(), dy, dx, bool(flips[i]), 3)
        assert np.array_equal(out[i].numpy(), ref)


def test_crop_pads_with_zeros_and_flip_mirrors_on_a_known_image() -> None:
    image = torch.arange(1, 17, dtype=torch.uint8).view(1, 1, 4, 4)
    corner = crop_flip(image, torch.tensor([[0, 0]]), torch.tensor([False]), padding=2)
    expected = torch.zeros(4, 4, dtype=torch.uint8)
    expected[2:, 2:] = torch.tensor([[1, 2], [5, 6]], dtype=torch.uint8)
    assert torch.equal(corner[0, 0], expected)
    mirrored = crop_flip(image, torch.tensor([[0, 0]]), torch.tensor([True]), padding=0)
    assert torch.equal(mirrored[0, 0], image[0, 0].flip(-1))


def test_loader_augments_before_normalising_so_padding_is_black() -> None:
    white = torch.full((64, 3, 8, 8), 255, dtype=torch.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = TensorLoader(white, torch.zeros(64, dtype=torch.int64), batch_size=64, train=True,
                          seed=0, mean=mean, std=std, augment=AugmentSpec(crop_padding=2))
    pixels = to_uint8(epoch(loader)[0][0], mean, std)
    assert set(np.unique(pixels)) == {0.0, 255.0}
    # Each image's zeros are whole border rows/columns, at most 2 deep on one side.
    black = pixels[:, 0] == 0
    assert black[:, 2:6, 2:6].sum() == 0 and black.any(axis=(1, 2)).sum() > 40


def test_val_is_normalised_and_unaugmented() -> None:
    images = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
    loader = TensorLoader(images, torch.arange(10), batch_size=4, train=False, seed=0,
                          mean=mean, std=std, augment=AugmentSpec(crop_padding=4, flip=True))
    x = torch.cat([b for b, _ in epoch(loader)])
    ref = (images.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)) / (
        torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    )
    assert torch.allclose(x.double(), ref, atol=1e-5)


def cifar_cfg(name: str, root: Path | None, **overrides) -> OmegaConf:
    root = None if root is None else str(root)
    return make_cfg(**{"name": name, "root": root, "image_size": None, "batch_size": 4,
                       **overrides})


# --- CIFAR ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fine", [False, True])
def test_cifar_reads_torchvision_files_in_order_with_labels(tmp_path: Path, fine: bool) -> None:
    written = write_cifar(tmp_path, fine=fine)
    release = cifar.CIFAR100 if fine else cifar.CIFAR10
    some_file = tmp_path / release.folder / ("test" if fine else "test_batch")
    with open(some_file, "rb") as f:  # the keys read back as Python 2 byte strings
        assert set(pickle.load(f, encoding="bytes")) >= {b"data", b"batch_label"}
    name = "cifar100" if fine else "cifar10"
    bundle = build(cifar_cfg(name, tmp_path), CPU, 0)
    data, labels = written["test" if fine else "test_batch"]
    val = epoch(bundle.val)
    pixels = np.concatenate([to_uint8(x, cifar.MEAN, cifar.STD) for x, _ in val])
    # Row-major 3072 bytes = 1024 red, 1024 green, 1024 blue, each 32x32.
    assert np.array_equal(pixels, data.reshape(-1, 3, 32, 32))
    assert torch.cat([y for _, y in val]).tolist() == labels
    train_labels = sorted(torch.cat([y for _, y in epoch(bundle.train)]).tolist())
    test_files = ("test", "test_batch")
    all_train = [v for k, (_, lab) in written.items() if k not in test_files for v in lab]
    assert train_labels == sorted(all_train)


def test_cifar_default_augmentation_is_crop4_and_flip(cifar_root: Path) -> None:
    bundle = build(cifar_cfg("cifar10", cifar_root), CPU, 0)
    assert bundle.train.augment == AugmentSpec(crop_padding=4, flip=True)


def test_cifar_errors_name_the_path_and_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset.root is not set.*cifar-10-batches-py"):
        build(cifar_cfg("cifar10", None), CPU, 0)
    with pytest.raises(UserError) as error:
        build(cifar_cfg("cifar100", tmp_path), CPU, 0)
    message = str(error.value)
    assert str(tmp_path / "cifar-100-python") in message and "dataset.download=true" in message
    assert "\n" not in message
    write_cifar(tmp_path, fine=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match="data_batch_3 is missing"):
        build(cifar_cfg("cifar10", tmp_path), CPU, 0)


# --- ImageNet (ImageFolder) -----------------------------------------------------------------------


def imagenet_cfg(root: Path, **overrides) -> OmegaConf:
    return make_cfg(**{"name": "imagenet", "root": str(root), "image_size": 32, "batch_size": 4,
                       **overrides})


def test_imagenet_is_deterministic_per_seed_and_epoch_whatever_the_workers(
    imagenet_root: Path,
) -> None:
    serial = build(imagenet_cfg(imagenet_root), CPU, seed=3)
    workers = build(imagenet_cfg(imagenet_root, num_workers=2), CPU, seed=3)
    first = epoch(serial.train, 1)
    for (xa, ya), (xb, yb) in zip(first, epoch(workers.train, 1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, epoch(serial.train, 2)))
    # Val: center crop, fixed order.
    va, vb = epoch(serial.val), epoch(serial.val)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(va, vb))
    assert torch.cat([y for _, y in va]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("name", ["synthetic", "imagenet"])
def test_a_resumed_epoch_skips_done_batches_without_loading_them(
    name: str, imagenet_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """set_epoch(e, skip=k) gives batches k.. of the uninterrupted epoch e, loading no image of
    the first k (on ImageNet, decoding them would cost minutes per resume); the next set_epoch
    starts from the first batch again."""
    cfg = imagenet_cfg(imagenet_root) if name == "imagenet" else make_cfg(augment={"flip": True})
    loader = build(cfg, CPU, seed=5).train
    full = epoch(loader, 2)
    assert len(full) == len(loader) >= 3
    if name == "imagenet":
        loaded = []
        original = type(loader.loader.dataset).__getitem__
        monkeypatch.setattr(type(loader.loader.dataset), "__getitem__",
                            lambda self, item: loaded.append(item) or original(self, item))
    loader.set_epoch(2, skip=2)
    assert len(loader) == len(full)  # the epoch's length, whatever was skipped
    tail = list(loader)
    assert len(tail) == len(full) - 2
    for (xa, ya), (xb, yb) in zip(tail, full[2:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    if name == "imagenet":
        assert len(loaded) == sum(len(y) for _, y in tail)
    assert len(epoch(loader, 2)) == len(full)


def test_imagenet_ranks_share_val_exactly_once_and_train_disjointly(imagenet_root: Path) -> None:
    cfg = imagenet_cfg(imagenet_root, batch_size=2, augment={"flip": False})
    ranks = [build(cfg, CPU, seed=0, rank=r, world_size=2) for r in range(2)]
    val = [torch.cat([x for x, _ in epoch(b.val)]) for b in ranks]
    single = torch.cat([x for x, _ in epoch(build(cfg, CPU, seed=0).val)])
    assert torch.equal(torch.cat(val), single)  # 9 images: 4 + 5, none padded or repeated
    samplers = [list(b.train.sampler) for b in ranks]
    assert not {i for _, i in samplers[0]} & {i for _, i in samplers[1]}
    assert len(ranks[0].train) == len(ranks[1].train) == 6  # 12 images, 1 per rank per batch


def test_imagenet_val_split_takes_val_from_train_with_val_transform(imagenet_root: Path) -> None:
    bundle = build(imagenet_cfg(imagenet_root, val_split=0.25), CPU, seed=0)
    assert (bundle.train_size, bundle.val_size) == (9, 3)
    held = bundle.val.loader.dataset
    assert held.folder.root.endswith("train") and held.seed is None
    x, y = next(iter(bundle.val))
    assert x.shape == (3, 3, 32, 32) and sorted(y.tolist()) == [0, 1, 2]


def test_imagenet_errors_name_the_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="dataset.root is not set"):
        build(make_cfg(name="imagenet", batch_size=4), CPU, 0)
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'} does not exist.*<class>"):
        build(imagenet_cfg(tmp_path / "nowhere"), CPU, 0)
    (tmp_path / "train" / "n001").mkdir(parents=True)  # a class folder without images
    with pytest.raises(UserError, match=f"no images under {tmp_path / 'train'}.*JPEG"):
        build(imagenet_cfg(tmp_path), CPU, 0)
    write_image_folder(tmp_path / "full")
    shutil.rmtree(tmp_path / "full" / "val")
    with pytest.raises(UserError, match=f"{tmp_path / 'full' / 'val'} does not exist"):
        build(imagenet_cfg(tmp_path / "full"), CPU, 0)


def test_imagenet_corrupt_image_read_in_a_worker_is_named_in_one_line(imagenet_root: Path) -> None:
    """A DataLoader worker's error arrives as its whole traceback; the loader turns it into one
    line naming the file (tests/test_imagenet.py checks both loaders in-process)."""
    path = imagenet_root / "train" / "n002" / "img2.JPEG"
    path.write_bytes(path.read_bytes()[:200])
    loader = build(imagenet_cfg(imagenet_root, num_workers=1), CPU, seed=0).train
    with pytest.raises(UserError) as error:
        epoch(loader)
    message = str(error.value)
    assert "\n" not in message and f"cannot decode image {path}" in message
    assert "check_imagenet.py" in message


# --- config errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "world_size", "pattern"),
    [
        (dict(batch_size=0), 1, "batch_size must be a positive integer, got 0"),
        (dict(batch_size=-8), 1, "batch_size must be a positive integer"),
        (dict(batch_size=97), 1, r"larger than the train split \(96 samples\)"),
        (dict(batch_size=15), 2, "not divisible by world_size=2"),
        (dict(val_split=1.0), 1, r"val_split must be in \[0, 1\)"),
        (dict(augment={"crop_padding": -1}), 1, "crop_padding must be an integer >= 0"),
        (dict(eval_batch_size=0), 1, "eval_batch_size must be a positive integer"),
    ],
)
def test_config_errors_say_what_to_change(overrides, world_size, pattern) -> None:
    cfg = make_cfg(**overrides)
    with pytest.raises(UserError, match=pattern) as error:
        build(cfg, CPU, 0, world_size=world_size)
    assert "\n" not in str(error.value)


def test_val_split_larger_than_needed_batch_reports_the_split_size() -> None:
    with pytest.raises(UserError, match=r"train split \(86 samples\)"):
        build(make_cfg(batch_size=90, val_split=0.1), CPU, 0)
