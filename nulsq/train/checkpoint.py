"""Checkpoints and run files, written atomically (temp file + rename), and run loading.

A checkpoint holds everything an exact resume needs: model, every optimizer and scheduler, the
stage and epoch/step counters, the best metric, all RNG states, the W&B run id, and a fingerprint of
the config so a checkpoint of another run is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from nulsq.errors import UserError

# Keys that may change between a run and its resume without changing the maths.
_RESUME_FREE_KEYS = ("trainer.resume", "trainer.max_steps", "trainer.output_dir", "trainer.device",
                     "trainer.compile", "trainer.log_interval", "logger", "dataset.num_workers",
                     "dataset.root", "init.from_run", "model.pretrained", "model.cache_dir",
                     "model.pretrained_tag", "dataset.download", "paths")


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
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | list, rank: int = 0) -> None:
    """Restore RNG states saved by `rng_state`: one dict, or one per DDP rank (this rank's is
    used; a job resumed with more ranks than it was saved with gives the new ranks rank 0's)."""
    if isinstance(state, list):
        state = state[rank] if rank < len(state) else state[0]
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint written by this trainer; a missing or unreadable file is a UserError."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001  (any unpickling failure means a corrupt file)
        prev = path.with_name(path.name + ".prev")
        fix = f"resume from the one before with trainer.resume={prev}" if prev.is_file() else (
            "point trainer.resume at another one")
        raise UserError(
            f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}); "
            f"delete it, or {fix}"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "fingerprint" not in ckpt:
        raise UserError(f"{path} is not a nulsq training checkpoint (no model/fingerprint entry)")
    return ckpt


def _same_config(run_dir: Path, fingerprint: str | None) -> bool:
    """Whether the run in `run_dir` was made with a config of this fingerprint (None: any)."""
    if fingerprint is None:
        return True
    cfg_path = run_dir / "config.yaml"
    try:
        return cfg_path.is_file() and config_fingerprint(OmegaConf.load(cfg_path)) == fingerprint
    except Exception:  # noqa: BLE001  (an unreadable config.yaml is simply not this run's)
        return False


def find_resume(resume: str | None, run_dir: Path, fingerprint: str | None = None) -> Path | None:
    """The checkpoint `trainer.resume` points at: null -> none; a path -> that file (or a run
    directory's checkpoints/last.pt); auto -> this run directory's last.pt, else the newest
    unfinished sibling run (same experiment, method, bits and seed) that has one and, when
    `fingerprint` is given, the same config (a sibling stopped by a NaN loss and rerun with a
    lower lr is a different run, not one to continue)."""
    if resume in (None, "", "none", "null"):
        return None
    if resume != "auto":
        path = Path(resume)
        return path / "checkpoints" / "last.pt" if path.is_dir() else path
    own = run_dir / "checkpoints" / "last.pt"
    if own.is_file():
        return own
    candidates = []
    for sibling in run_dir.parent.glob("*/checkpoints/last.pt") if run_dir.parent.exists() else []:
        summary = sibling.parent.parent / "summary.json"
        finished = summary.is_file() and json.loads(summary.read_text()).get("status") == "finished"
        if not finished and _same_config(sibling.parent.parent, fingerprint):
            candidates.append(sibling)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def load_run(run_dir: str | Path, device: str = "cpu"):
    """Rebuild a run's model (quantized as configured) with its last weights: (model, cfg)."""
    from nulsq.train.build import build_model  # local: avoids an import cycle with the trainer

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.yaml)")
    cfg = OmegaConf.load(cfg_path)
    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    model, _ = build_model(cfg, num_classes=ckpt["num_classes"], quantized=ckpt["stage"] == "qat",
                           verbose=False, load_pretrained=False, image_size=ckpt.get("image_size"))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg
