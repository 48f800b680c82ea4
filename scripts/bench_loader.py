"""Images per second of the ImageNet loaders (`dataset.loader`), train and val transforms.

    python scripts/bench_loader.py                        # generated folder, both loaders
    python scripts/bench_loader.py --root /data/imagenet --batch-size 256 --workers 16

Without --root, writes an ImageNet-like folder first (--images train JPEGs, a quarter as many val,
10 classes, sizes drawn from 400-500 x 350-500 px, quality 90: ImageNet's typical files) into
--make (a temporary folder by default; an existing one with the same settings is reused).
Each loader is built as the trainer builds it (`nulsq.data.build`, image_size 224, the given
global batch size and `num_workers`) on --device. Every timed round runs one epoch of every
case in turn, so a busy machine slows them alike; a case's rate is (batches - 1) x batch size
over the time from its first batch to its last (steady state: worker start-up and the first
batch's latency are left out), the median over the rounds after a warm-up round, and each
ratio is the median of the per-round ratios to the torchvision loader.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nulsq.data import build  # noqa: E402
from nulsq.data.imagenet import check_loader, dali_installed  # noqa: E402
from nulsq.errors import UserError  # noqa: E402
from nulsq.train.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402

CLASSES = 10


def make_folder(
    root: Path, images: int, width: tuple[int, int], height: tuple[int, int], quality: int = 90
) -> Path:
    """<root>/{train,val}/<class>/*.JPEG: `images` train and images // 4 val JPEGs, reused when
    present. Smooth random colour fields plus grain: at 400-500 px and quality 90 they come out
    at about 100 KB, as ImageNet's photographs do (JPEG decoding time follows the coded size)."""
    stamp = root / "settings.json"
    settings = {"images": images, "width": list(width), "height": list(height), "quality": quality}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return root
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", max(images // 4, CLASSES))):
        for i in range(count):
            folder = root / split / f"n{i % CLASSES:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            w, h = int(rng.integers(width[0], width[1] + 1)), int(rng.integers(height[0], height[1] + 1))
            coarse = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            base = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), np.float32)
            grain = rng.normal(0.0, 16.0, (h, w, 3)).astype(np.float32)
            pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"img{i:06d}.JPEG", quality=quality)
    atomic_write_text(stamp, json.dumps(settings))
    return root


def loader_cfg(root: Path, loader: str, batch_size: int, workers: int, image_size: int):
    return OmegaConf.create(
        dict(
            name="imagenet", root=str(root), batch_size=batch_size, eval_batch_size=None,
            val_split=0, split_seed=0, num_workers=workers, image_size=image_size, augment=None,
            loader=loader,
        )
    )


def epoch_rate(loader, epoch: int, device: torch.device) -> float:
    """Images/s from the first batch to the last of one epoch (steady state)."""
    loader.set_epoch(epoch)
    count, first, images = 0, None, 0
    for x, _ in loader:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if first is None:
            first = time.perf_counter()
        else:
            images += len(x)
        count += 1
    if count < 2:
        raise SystemExit("fewer than 2 batches per epoch: use more --images or a smaller --batch-size")
    return images / (time.perf_counter() - first)


def loader_names(value: str) -> list[str]:
    """--loaders: comma-separated `dataset.loader` values, checked before any folder is made."""
    try:
        return [check_loader(name) for name in value.split(",")]
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def run(args: argparse.Namespace) -> dict:
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    loaders = [name for name in args.loaders if name != "dali" or dali_installed()]
    skipped = sorted(set(args.loaders) - set(loaders))
    if args.root is not None:
        root = args.root
    else:
        root = Path(args.make or Path(tempfile.gettempdir()) / "nulsq_bench_imagenet")
        t0 = time.perf_counter()
        make_folder(root, args.images, tuple(args.width), tuple(args.height))
        print(f"folder {root} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    jpegs = list((root / "train").rglob("*.JPEG"))
    mean_kb = sum(p.stat().st_size for p in jpegs) / max(len(jpegs), 1) / 1024
    cases = {}
    for name in loaders:
        bundle = build(
            loader_cfg(root, name, args.batch_size, args.workers, args.image_size), device, seed=0
        )
        cases[(name, "train")], cases[(name, "val")] = bundle.train, bundle.val
    rates: dict[tuple[str, str], list[float]] = {case: [] for case in cases}
    for round_ in range(args.rounds + 1):  # round 0 warms up (worker start, first decode)
        for case, loader in cases.items():
            rate = epoch_rate(loader, round_, device)
            if round_:
                rates[case].append(rate)
    rows = []
    for (name, split), values in rates.items():
        base = rates[("torchvision", split)] if ("torchvision", split) in rates else None
        ratio = statistics.median(v / b for v, b in zip(values, base)) if base else None
        rows.append({
            "loader": name, "split": split, "images_per_s": statistics.median(values),
            "ratio": ratio, "per_round": values,
        })
    return {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "machine": platform.processor() or platform.machine(),
        "folder": str(root),
        "train_images": len(jpegs),
        "mean_jpeg_kb": mean_kb,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "image_size": args.image_size,
        "rounds": args.rounds,
        "skipped": skipped,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, help="an existing ImageFolder (train/ and val/)")
    parser.add_argument("--make", type=Path, help="where to generate the folder (default: temp dir)")
    parser.add_argument("--images", type=int, default=3000, help="train JPEGs to generate")
    parser.add_argument("--width", type=int, nargs=2, default=[400, 500], metavar=("MIN", "MAX"))
    parser.add_argument("--height", type=int, nargs=2, default=[350, 500], metavar=("MIN", "MAX"))
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="dataset.num_workers (DALI: as many reader processes and DALI threads)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs per case")
    parser.add_argument("--loaders", type=loader_names, default=["torchvision", "dali"])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    result = run(args)
    print(
        f"{result['device']}, {result['cpu_count']} CPUs (load average {result['load_average']:.1f}), "
        f"{result['train_images']} train JPEGs of {result['mean_jpeg_kb']:.0f} KB on average, "
        f"batch {args.batch_size}, {args.workers} workers, {args.image_size}px, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'loader':<12} {'split':<6} {'images/s':>9}  vs torchvision")
    for row in result["rows"]:
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x"
        print(f"{row['loader']:<12} {row['split']:<6} {row['images_per_s']:>9.0f}  {ratio}")
    for name in result["skipped"]:
        print(f"{name}: skipped (not installed; pip install -e '.[dali]')")
    if args.out:
        atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
