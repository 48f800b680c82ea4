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
                     "dataset.root", "init.from_run", "model.pretrained", "model.cache_dir")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename over `path`; the previous
    file is kept as `<name>.prev` so a crash during the rename never leaves no checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, path.with_name(path.name + ".prev"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def set_rng_state(state: dict) -> None:
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
        raise UserError(
            f"checkpoint {path} is corrupt or not a torch file ({type(err).__name__}); "
            f"delete it or point trainer.resume at another one"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "fingerprint" not in ckpt:
        raise UserError(f"{path} is not a nulsq training checkpoint (no model/fingerprint entry)")
    return ckpt


def find_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint `trainer.resume` points at: null -> none; a path -> that file (or a run
    directory's checkpoints/last.pt); auto -> this run directory's last.pt, else the newest
    unfinished sibling run (same experiment, method, bits and seed) that has one."""
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
        if not finished:
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
