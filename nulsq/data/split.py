"""Which samples go where: fixed stratified splits and the per-rank shard of an eval set.

Splits depend only on `dataset.split_seed` (never on the trainer seed), so every run of a sweep
trains and validates on the same samples.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from nulsq.errors import UserError


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int, purpose: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into (kept, held out), holding out `fraction` of every class.

    The held-out total is round(fraction * N); it is shared among classes by largest remainder,
    so each class gives floor or ceil of fraction * its count.

    Args:
        labels: integer label per sample, shape (N,).
        fraction: share of samples to hold out, in [0, 1).
        seed: the split seed.
        purpose: a name for this split ("test", "val") so different splits drawn from one seed
            are independent of each other.

    Returns:
        Two sorted int64 index arrays that partition range(N).
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    total = int(np.floor(fraction * len(labels) + 0.5))
    quotas = fraction * counts
    take = np.floor(quotas).astype(np.int64)
    # Stable sort: on equal remainders the lower class index gets the extra sample.
    order = np.argsort(-(quotas - take), kind="stable")
    take[order[: total - int(take.sum())]] += 1

    rng = np.random.default_rng([seed % 2**64, zlib.crc32(purpose.encode())])
    held = [rng.permutation(np.flatnonzero(labels == c))[:k] for c, k in zip(classes, take)]
    held_idx = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)
    kept_idx = np.setdiff1d(np.arange(len(labels), dtype=np.int64), held_idx)
    return kept_idx, held_idx


def val_fraction(cfg: Mapping[str, Any]) -> float:
    """`dataset.val_split`: 0 uses the official val/test set, 0 < f < 1 holds out f of train."""
    fraction = float(cfg.get("val_split", 0) or 0)
    if not 0 <= fraction < 1:
        raise UserError(
            f"dataset.val_split must be in [0, 1) (0 = official val set, 0.1 = hold out 10% of "
            f"train), got {fraction}"
        )
    return fraction


def holdout(labels: np.ndarray, cfg: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices into the train set for `dataset.val_split` > 0 (the paper's 90/10).

    Args:
        labels: label per train sample.
        cfg: the dataset config (`val_split`, `split_seed`).
    """
    fraction = val_fraction(cfg)
    kept, held = stratified_split(labels, fraction, int(cfg.get("split_seed", 0) or 0), "val")
    if len(held) == 0 or len(kept) == 0:
        raise UserError(
            f"dataset.val_split={fraction} of {len(labels)} train samples leaves an empty split; "
            "use a larger val_split or val_split=0"
        )
    return kept, held


def shard_range(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous shard of n samples; shards differ by at most one sample
    and cover every sample exactly once (nothing is padded, so metrics need no de-duplication)."""
    return n * rank // world_size, n * (rank + 1) // world_size
