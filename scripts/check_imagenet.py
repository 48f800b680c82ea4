"""Check an ImageNet folder before a long run: layout, class and image counts, unreadable files.

    python scripts/check_imagenet.py /data/imagenet [--workers 16] [--no-decode]

Reads <root>/train/<class>/* and <root>/val/<class>/* the way `dataset=imagenet` reads them
(torchvision's ImageFolder rules: class = sub-folder, image = a file with an image extension) and
reports what would stop or skew a run: a missing split, class folders that differ between train
and val, empty class folders, files that are not images, and every image that does not decode.
Each image is decoded at 1/8 scale (JPEG DCT scaling reads the whole file, so a truncated or
corrupt file still fails, at a fraction of the cost of a full decode). Exit status 0 when nothing
is wrong, 1 otherwise. Counts that differ from ImageNet-1k (ILSVRC2012) are stated, not errors:
subsets and other ImageFolders are fine.
"""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from multiprocessing import Pool
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file from anywhere
    sys.path.insert(0, str(ROOT))

from nulsq.data.imagenet import LAYOUT, unreadable  # noqa: E402

IMAGENET_1K = {"classes": 1000, "train": 1_281_167, "val": 50_000}
SHOWN = 20  # problems listed per kind; the rest are counted


def scan(split: Path) -> tuple[dict[str, list[Path]], list[Path]]:
    """({class: [image paths]}, [files that are not images]) under one split folder."""
    classes: dict[str, list[Path]] = {}
    others: list[Path] = []
    for folder in sorted(p for p in split.iterdir() if p.is_dir()):
        images = classes.setdefault(folder.name, [])
        for dirpath, _, names in os.walk(folder, followlinks=True):
            for name in sorted(names):
                path = Path(dirpath) / name
                (images if name.lower().endswith(IMG_EXTENSIONS) else others).append(path)
    return classes, others


def check(root: Path, workers: int = 1, decode: bool = True) -> tuple[list[str], list[str]]:
    """(report lines, problem lines) for the ImageNet folder at `root`."""
    report: list[str] = []
    problems: list[str] = []

    def listed(kind: str, items: list) -> None:
        if items:
            problems.append(f"{len(items)} {kind}:")
            problems.extend(f"  {item}" for item in items[:SHOWN])
            if len(items) > SHOWN:
                problems.append(f"  ... and {len(items) - SHOWN} more")

    if not root.is_dir():
        return report, [f"{root} does not exist; expected {LAYOUT}"]
    splits: dict[str, dict[str, list[Path]]] = {}
    for name in ("train", "val"):
        if not (root / name).is_dir():
            problems.append(f"{root / name} is missing; expected {LAYOUT}")
            continue
        classes, others = scan(root / name)
        splits[name] = classes
        count = sum(len(v) for v in classes.values())
        report.append(f"{name}: {len(classes)} classes, {count} images")
        empty = [root / name / c for c, images in classes.items() if not images]
        listed(f"class folders without images in {name}", empty)
        listed(f"files in {name} that are not images (ignored by the loader)", others)
    if len(splits) == 2 and splits["train"].keys() != splits["val"].keys():
        train, val = set(splits["train"]), set(splits["val"])
        listed("classes in train but not in val", sorted(train - val))
        listed("classes in val but not in train", sorted(val - train))
    counts = {"classes": len(splits.get("train", {}))}
    counts.update({k: sum(len(v) for v in c.values()) for k, c in splits.items()})
    if counts == IMAGENET_1K:
        report.append("counts match ImageNet-1k (ILSVRC2012)")
    elif len(splits) == 2:
        report.append(
            f"note: ImageNet-1k has {IMAGENET_1K['classes']} classes, {IMAGENET_1K['train']} train "
            f"and {IMAGENET_1K['val']} val images; this folder differs (fine for a subset)"
        )
    if decode:
        paths = [p for classes in splits.values() for images in classes.values() for p in images]
        bad: list[str] = []
        with Pool(workers) if workers > 1 else _Serial() as pool:
            reasons = pool.imap(partial(unreadable, draft=True), paths, 256)  # picklable: no lambda
            for done, (path, reason) in enumerate(zip(paths, reasons), 1):
                if reason is not None:
                    bad.append(f"{path}: {reason}")
                if done % 100_000 == 0:
                    print(f"decoded {done}/{len(paths)}", file=sys.stderr, flush=True)
        report.append(f"decoded {len(paths)} images: {len(bad)} unreadable")
        listed("unreadable images (delete or replace them)", sorted(bad))
    return report, problems


class _Serial:
    """Pool's imap in this process (no start-up cost for small folders)."""

    def __enter__(self) -> _Serial:
        return self

    def __exit__(self, *_) -> None:
        pass

    def imap(self, func, items, chunksize=1):
        return map(func, items)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder holding train/ and val/")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decoding processes")
    parser.add_argument("--no-decode", action="store_true", help="count only, decode nothing")
    args = parser.parse_args(argv)
    report, problems = check(args.root.expanduser(), args.workers, not args.no_decode)
    print("\n".join(report))
    if problems:
        print("PROBLEMS:\n" + "\n".join(problems))
        return 1
    print("OK: ready for dataset.root=" + str(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
