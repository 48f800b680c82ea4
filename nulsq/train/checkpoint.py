"""Checkpoints and run files, written atomically (temp file + rename), and read without running code.

A checkpoint holds everything an exact resume needs: model, every optimizer and scheduler, the
stage and epoch/step counters, the best metric, all RNG states, the W&B run id, and a fingerprint of
the config so a checkpoint of another run is refused. Since format 2 it holds only tensors and plain
values (dict, list, str, numbers, bool, None): the RNG states as tensors and lists of ints, the
resolved config as a YAML string, so it loads with `torch.load(weights_only=True)`
(nulsq/safe_load.py) and a crafted file cannot run code on the machine that reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from nulsq.errors import UserError
from nulsq.rundir import find_resume  # noqa: F401  (the trainer's name; it lives in rundir)
from nulsq.safe_load import load_torch_file

# The "format" entry: 2 = tensors and plain values only, config inside (see the module docstring).
FORMAT = 2
# Plain values a checkpoint may hold besides tensors; anything else would need unpickling code.
_PLAIN = (str, int, float, bool, type(None))
# What a W&B run id looks like (it names folders and URLs: nothing else is passed to wandb).
_WANDB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Keys that may change between a run and its resume without changing the maths.
_RESUME_FREE_KEYS = ("trainer.resume", "trainer.trust_checkpoint", "trainer.max_steps",
                     "trainer.output_dir", "trainer.device", "trainer.compile", "trainer.log_interval",
                     "logger", "dataset.num_workers", "dataset.root", "init.from_run",
                     "model.pretrained", "model.cache_dir", "model.pretrained_tag", "dataset.download",
                     "paths")


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file in `path`'s folder (same filesystem, so the final rename is atomic),
    readable like any file the user creates (mkstemp alone would make it owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def remove_stale_temps(path: Path) -> None:
    """Delete temp files a killed writer of `path` left behind (SIGKILL runs no cleanup)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def _write_atomically(path: Path, write) -> None:
    """`write(file)` into a temp file, fsync, then rename it over `path`; on any failure (or
    KeyboardInterrupt) the temp file is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _write_atomically(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _keep_previous(path: Path) -> None:
    """Make `<name>.prev` a copy of `path` while `path` itself stays in place, so that at every
    instant `path` exists and is complete (a kill between two renames cannot lose it)."""
    if not path.exists():
        return
    prev = path.with_name(path.name + ".prev")
    fd, tmp = _temp_beside(prev)
    os.close(fd)
    try:
        try:
            os.unlink(tmp)
            os.link(path, tmp)  # a hard link: no copy of a large file
        except OSError:  # filesystems without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, prev)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save `obj` to `path` atomically (temp file in the same folder, fsync, rename).

    The file being replaced is kept as `<name>.prev`, and `path` is never missing nor partly
    written, whenever the process dies; temp files of an earlier killed write are removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    remove_stale_temps(path.with_name(path.name + ".prev"))
    _keep_previous(path)
    _write_atomically(path, lambda f: torch.save(obj, f))


def config_fingerprint(cfg) -> str:
    """A hash of the config without the keys a resume may change (paths, logging, limits)."""
    data = OmegaConf.to_container(cfg, resolve=True)
    for dotted in _RESUME_FREE_KEYS:
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def rng_state() -> dict:
    """Every RNG's state as tensors, lists of ints and numbers (a weights-only load reads it)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _upgrade_rng(state: dict) -> dict:
    """A state saved by nulsq before format 2 (python's tuple, numpy's array) in today's form."""
    if isinstance(state.get("python"), tuple):
        version, internal, gauss = state["python"]
        state["python"] = {"version": version, "state": list(internal), "gauss": gauss}
    if isinstance(state.get("numpy"), tuple):
        kind, keys, pos, has_gauss, cached = state["numpy"]
        state["numpy"] = {"kind": kind, "keys": [int(k) for k in keys], "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return state


def set_rng_state(state: dict | list, rank: int = 0) -> None:
    """Restore RNG states saved by `rng_state`: one dict, or one per DDP rank (this rank's is
    used; a job resumed with more ranks than it was saved with gives the new ranks rank 0's)."""
    if isinstance(state, list):
        state = state[rank] if rank < len(state) else state[0]
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    np.random.set_state((npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError naming the first value of `obj` that a weights-only load could not read
    (a numpy scalar in a metric, a class instance): caught when saving, not when resuming."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:  # exact: np.float64 is a float
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{where} has a key of type {type(key).__name__}")
            check_plain(value, f"{where}[{key!r}]")
    elif type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}, not a tensor "
                        f"or plain value; a weights-only load would refuse it")


def save_checkpoint(path: Path, fields: dict, cfg) -> None:
    """Write a training checkpoint (format 2: `fields` plus the format and the resolved config as
    YAML) atomically; see atomic_torch_save."""
    ckpt = {"format": FORMAT, "config": OmegaConf.to_yaml(cfg, resolve=True), **fields}
    check_plain(ckpt)
    atomic_torch_save(path, ckpt)


def load_checkpoint(path: Path, trust: bool = False,
                    trust_hint: str = "trainer.trust_checkpoint=true") -> dict:
    """Read a checkpoint written by this trainer, tensors and plain values only (never code).

    Args:
        path: the checkpoint file.
        trust: also read checkpoints of nulsq before format 2 (numpy arrays allowed, still no code).
        trust_hint: how the user turns `trust` on, named in the message refusing an old checkpoint.

    Raises:
        UserError: missing, corrupt, refused (it names code to run), old without `trust`, or not a
            nulsq training checkpoint.
    """
    prev = path.with_name(path.name + ".prev")
    fix = f"use the one before it, {prev}" if prev.is_file() else "use another checkpoint"
    ckpt = load_torch_file(path, "checkpoint", f"delete it, or {fix}", trust, trust_hint)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "fingerprint" not in ckpt:
        raise UserError(f"{path} is not a nulsq training checkpoint (no model/fingerprint entry)")
    wandb_id = ckpt.get("wandb_id")
    if wandb_id is not None and not (isinstance(wandb_id, str) and _WANDB_ID.match(wandb_id)):
        raise UserError(f"checkpoint {path} holds a malformed W&B run id {str(wandb_id)[:40]!r}; "
                        f"it was not written by nulsq or was altered: do not resume it")
    if "rng" in ckpt:
        rng = ckpt["rng"]
        ckpt["rng"] = [_upgrade_rng(s) for s in rng] if isinstance(rng, list) else _upgrade_rng(rng)
    return ckpt
