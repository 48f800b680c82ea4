"""The ImageNet loaders (`dataset.loader`): torchvision and DALI (its CPU backend, so CI runs it)
give the same batches on a tiny JPEG folder written here; resume, DDP shards, corrupt files; the
folder check and the loader benchmark scripts.

DALI tests skip when NVIDIA DALI is not installed (`pip install -e '.[dali]'`)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from nulsq.data import build
from nulsq.data import imagenet as imagenet_module
from nulsq.data.imagenet import MEAN, STD, choose_loader, dali_installed
from nulsq.errors import UserError

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


def write_folder(root: Path, classes: int = 3, train: int = 8, val: int = 5) -> Path:
    """<root>/{train,val}/<class>/*.JPEG: smooth photo-like JPEGs of assorted sizes (one
    grayscale per split, as ImageNet has some), quality 90."""
    rng = np.random.default_rng(7)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:03d}"
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(40, 72, 2))
                coarse = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
                if c == 0 and i == 1:
                    image = image.convert("L")
                image.save(folder / f"img{i}.JPEG", quality=90)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture
def dali():
    return pytest.importorskip("nvidia.dali")


def cfg(root: Path, loader: str, **overrides):
    base = dict(
        name="imagenet", root=str(root), batch_size=4, eval_batch_size=None, val_split=0,
        split_seed=0, num_workers=0, image_size=SIZE, augment=None, loader=loader,
    )
    config = OmegaConf.create({**base, **overrides})
    OmegaConf.set_struct(config, True)
    return config


def epoch(loader, number: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(number, skip)
    return list(loader)


def both(root: Path, seed: int = 3, **overrides):
    return [build(cfg(root, name, **overrides), CPU, seed) for name in ("torchvision", "dali")]


# --- choosing the loader --------------------------------------------------------------------------


def test_auto_takes_dali_only_on_cuda_and_says_how_to_install_it(
    folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(imagenet_module, "dali_installed", lambda: False)
    assert choose_loader(cfg(folder, "auto"), CPU) == "torchvision"
    assert capsys.readouterr().out == ""  # CPU runs never wanted DALI
    assert choose_loader(cfg(folder, "auto"), cuda) == "torchvision"
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and "pip install -e '.[dali]'" in line
    assert choose_loader(cfg(folder, "auto"), cuda, say=False) == "torchvision"  # ranks > 0
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match=r"loader=dali needs NVIDIA DALI.*pip install -e '\.\[dali\]'"):
        choose_loader(cfg(folder, "dali"), CPU)
    with pytest.raises(UserError, match="unknown dataset.loader 'ffcv'; valid: auto, dali, torchvision"):
        choose_loader(cfg(folder, "ffcv"), CPU)
    monkeypatch.setattr(imagenet_module, "dali_installed", lambda: True)
    assert choose_loader(cfg(folder, "auto"), cuda) == "dali"
    assert choose_loader(cfg(folder, "torchvision"), cuda) == "torchvision"
    assert choose_loader(cfg(folder, "dali"), CPU) == "dali"  # DALI's CPU backend, on request


# --- the DALI loader against the torchvision one ---------------------------------------------------


@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_both_loaders_yield_normalised_batches_of_the_contract(name: str, folder: Path) -> None:
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    bundle = build(cfg(folder, name), CPU, seed=0)
    low = [(0 - m) / s for m, s in zip(MEAN, STD)]
    high = [(1 - m) / s for m, s in zip(MEAN, STD)]
    for loader, batches, samples in ((bundle.train, 6, 24), (bundle.val, 4, 15)):
        got = epoch(loader, 0)
        assert len(got) == len(loader) == batches
        assert sum(len(y) for _, y in got) == samples
        for x, y in got:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE) and x.is_contiguous()
            assert y.dtype == torch.int64 and len(y) == len(x) and set(y.tolist()) <= {0, 1, 2}
            for c in range(3):
                assert low[c] - 1e-5 <= x[:, c].min() and x[:, c].max() <= high[c] + 1e-5
    val_labels = torch.cat([y for _, y in epoch(bundle.val, 0)]).tolist()
    assert val_labels == [0] * 5 + [1] * 5 + [2] * 5  # every val image once, in folder order


def test_dali_gives_the_torchvision_batches(folder: Path, dali) -> None:
    """Same order, crop windows and flips (drawn by the same torchvision calls from the same
    seeds); the pixels differ only by the decoders' and resamplers' rounding."""
    tv, da = both(folder)
    for number in (0, 1):
        a, b = epoch(tv.train, number), epoch(da.train, number)
        assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
        xa, xb = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in b])
        # 0.03 of a std: about 2 of 255 grey levels on average
        assert (xa - xb).abs().mean(dim=(1, 2, 3)).max() < 0.03
        for dims in ((0, 2, 3),):  # crop statistics, per channel
            assert torch.allclose(xa.mean(dims), xb.mean(dims), atol=0.01)
            assert torch.allclose(xa.std(dims), xb.std(dims), atol=0.01)
    a, b = epoch(tv.val, 0), epoch(da.val, 0)
    assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
    assert (torch.cat([x for x, _ in a]) - torch.cat([x for x, _ in b])).abs().mean() < 0.02
    # different epochs draw different crops
    assert not torch.equal(epoch(da.train, 0)[0][0], epoch(da.train, 1)[0][0])


def test_dali_channels_last_output_holds_the_same_values(folder: Path, dali) -> None:
    """On CUDA the DALI loader writes HWC and hands over a channels_last view (the trainer's
    default memory format there): same values, no conversion left to do."""
    from nulsq.data.dali import DaliLoader

    nchw = build(cfg(folder, "dali"), CPU, seed=4).train
    nhwc = DaliLoader(nchw.split, CPU, workers=0, threads=1, channels_last=True)
    for (xa, ya), (xb, yb) in zip(epoch(nchw, 1), epoch(nhwc, 1), strict=True):
        assert xb.shape == xa.shape and xb.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_dali_resumes_mid_epoch_without_reading_the_done_batches(
    folder: Path, dali, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nulsq.data.dali import Source

    loader = build(cfg(folder, "dali"), CPU, seed=5).train
    full = epoch(loader, 2)
    reads: list[int] = []
    original = Source.sample
    monkeypatch.setattr(Source, "sample", lambda self, e, p: reads.append(p) or original(self, e, p))
    tail = epoch(loader, 2, skip=2)
    assert len(loader) == len(full) == 6 and len(tail) == 4
    for (xa, ya), (xb, yb) in zip(tail, full[2:], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(reads) == sum(len(y) for _, y in tail)  # nothing of the first 2 batches
    # The next epoch follows on the same pipeline (no rebuild) and equals a fresh loader's.
    pipe = loader._pipe
    following = epoch(loader, 3)
    assert loader._pipe is pipe
    fresh = epoch(build(cfg(folder, "dali"), CPU, seed=5).train, 3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(following, fresh, strict=True))
    # An epoch left unfinished is not continued by the next pass.
    loader.set_epoch(4)
    next(iter(loader))
    assert torch.equal(epoch(loader, 4)[0][0], epoch(build(cfg(folder, "dali"), CPU, 5).train, 4)[0][0])


def test_dali_ranks_see_disjoint_halves_as_torchvision_ranks_do(folder: Path, dali) -> None:
    from nulsq.data.dali import Source

    ranks = {
        name: [build(cfg(folder, name), CPU, seed=1, rank=r, world_size=2) for r in range(2)]
        for name in ("torchvision", "dali")
    }
    seen = []
    for r in range(2):
        tv, da = ranks["torchvision"][r], ranks["dali"][r]
        assert len(da.train) == len(tv.train) == 6  # 24 images: 12 per rank, 2 per batch
        a, b = epoch(tv.train, 0), epoch(da.train, 0)
        assert [y.tolist() for _, y in a] == [y.tolist() for _, y in b]
        source = Source(da.train.split, first_epoch=0, skip=0)
        seen.append({int(p) for i in range(len(da.train)) for p in source.batch(0, i)})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24
    single = torch.cat([x for x, _ in epoch(build(cfg(folder, "dali"), CPU, 1).val, 0)])
    halves = torch.cat([x for b in ranks["dali"] for x, _ in epoch(b.val, 0)])
    assert torch.equal(halves, single)  # 15 images: 7 + 8, none padded or repeated


# --- corrupt files --------------------------------------------------------------------------------


def corrupt(root: Path, how: str) -> Path:
    """Break one train image of a fresh folder: cut it in half, or replace it with text."""
    write_folder(root)
    path = root / "train" / "n001" / "img3.JPEG"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else b"not a jpeg\n")
    return path


@pytest.mark.parametrize("how", ["truncated", "garbage"])
@pytest.mark.parametrize("name", ["torchvision", "dali"])
def test_a_corrupt_jpeg_stops_the_epoch_with_one_line_naming_it(
    tmp_path: Path, name: str, how: str
) -> None:
    """(The same through a DataLoader worker process: tests/test_data.py, which runs no DALI:
    forking a process where DALI has run threads is not safe.)"""
    if name == "dali":
        pytest.importorskip("nvidia.dali")
    path = corrupt(tmp_path, how)
    loader = build(cfg(tmp_path, name), CPU, seed=0).train
    with pytest.raises(UserError) as error:
        epoch(loader, 0)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and "check_imagenet.py" in message


@pytest.mark.slow
def test_dali_reader_processes_give_the_in_process_batches_and_name_corrupt_files(
    folder: Path, tmp_path: Path, dali
) -> None:
    """num_workers > 0: the source runs in spawned processes (as on a GPU node)."""
    serial = epoch(build(cfg(folder, "dali"), CPU, seed=2).train, 1)
    parallel = epoch(build(cfg(folder, "dali", num_workers=1), CPU, seed=2).train, 1)
    for (xa, ya), (xb, yb) in zip(serial, parallel, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    path = corrupt(tmp_path, "garbage")
    with pytest.raises(UserError, match=f"cannot read image {path}"):
        epoch(build(cfg(tmp_path, "dali", num_workers=1), CPU, seed=0).train, 0)


# --- scripts --------------------------------------------------------------------------------------


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_imagenet_counts_and_lists_what_would_break_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    check = load_script("check_imagenet")
    good = write_folder(tmp_path / "good")
    assert check.main([str(good), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "train: 3 classes, 24 images" in out and "val: 3 classes, 15 images" in out
    assert "decoded 39 images: 0 unreadable" in out and "OK" in out

    bad = corrupt(tmp_path / "bad", "truncated")
    (tmp_path / "bad" / "val" / "n002" / "img0.JPEG").write_bytes(b"")
    (tmp_path / "bad" / "val" / "n002" / "notes.txt").write_text("x")
    (tmp_path / "bad" / "val" / "n009").mkdir()
    # As users run it, with a pool of 2 decoding processes (forked: not from this test process,
    # where DALI's threads may have run).
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_imagenet.py"), str(tmp_path / "bad"),
         "--workers", "2"], capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    out = proc.stdout
    assert f"{bad}: image file is truncated" in out
    assert "2 unreadable images" in out and "val/n002/img0.JPEG" in out
    assert "class folders without images in val" in out and "n009" in out
    assert "not images" in out and "notes.txt" in out
    assert "classes in val but not in train" in out

    assert check.main([str(tmp_path / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().out


def test_bench_loader_reports_each_loader_and_its_ratio(tmp_path: Path) -> None:
    bench = load_script("bench_loader")
    out = tmp_path / "bench.json"
    bench.main([
        "--make", str(tmp_path / "folder"), "--images", "24", "--width", "40", "60", "--height",
        "40", "60", "--batch-size", "4", "--workers", "0", "--rounds", "1", "--image-size", "16",
        "--device", "cpu", "--out", str(out),
    ])
    result = json.loads(out.read_text())
    names = ["torchvision"] + (["dali"] if dali_installed() else [])
    rows = {(r["loader"], r["split"]): r for r in result["rows"]}
    assert set(rows) == {(n, s) for n in names for s in ("train", "val")}
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert rows[("torchvision", "train")]["ratio"] == pytest.approx(1.0)
    stamp = (tmp_path / "folder" / "settings.json").stat().st_mtime_ns
    bench.make_folder(tmp_path / "folder", 24, (40, 60), (40, 60))  # same settings: reused
    assert (tmp_path / "folder" / "settings.json").stat().st_mtime_ns == stamp
    sizes = [Image.open(p).size for p in (tmp_path / "folder" / "train").rglob("*.JPEG")]
    assert len(sizes) == 24 and all(40 <= w <= 60 and 40 <= h <= 60 for w, h in sizes)


def test_bench_loader_refuses_an_unknown_loader_before_making_its_folder(tmp_path: Path, capsys) -> None:
    bench = load_script("bench_loader")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--make", str(tmp_path / "folder"), "--loaders", "torchvision,ffcv"])
    assert exit_info.value.code == 2 and not (tmp_path / "folder").exists()
    err = capsys.readouterr().err
    assert "argument --loaders: unknown dataset.loader 'ffcv'; valid: auto, dali, torchvision" in err


# --- through the trainer --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_dali_run_stopped_mid_epoch_and_resumed_ends_as_the_uninterrupted_one(
    folder: Path, tmp_path: Path, dali, one_thread
) -> None:
    """The trainer's set_epoch(epoch, skip) resume path on the DALI loader (3 steps per epoch,
    stopped after 4: mid-epoch 2), the quantizer initialisation's partial pass included."""
    from nulsq.train import run

    from conftest import compose_config

    def overrides(out: Path, *extra: str) -> list[str]:
        return [
            "dataset=imagenet", f"dataset.root={folder}", "dataset.loader=dali",
            "dataset.image_size=16", "dataset.batch_size=8", "dataset.num_workers=0",
            "trainer.device=cpu", "trainer.epochs=2", "trainer.seed=3", "pretrain.epochs=0",
            "quantizer=nulsq_a", "init.batches=2", f"trainer.output_dir={out}", *extra,
        ]

    run(compose_config(overrides(tmp_path / "full")))
    run(compose_config(overrides(tmp_path / "cut", "trainer.max_steps=4")))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "stopped"
    run(compose_config(overrides(tmp_path / "cut", "trainer.resume=auto")))
    weights = [torch.load(tmp_path / d / "checkpoints" / "last.pt", weights_only=False)["model"]
               for d in ("full", "cut")]
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
