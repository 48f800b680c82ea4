"""Scoring a checkpoint again (eval.py): the model its config describes, its weights and step
sizes, top-1/top-5 on the evaluation split, computed as the trainer's own evaluation computes them.

Nothing is rebuilt by hand: the config comes from the checkpoint (nulsq.rundir), the network and
its quantizers from the trainer's builder (nulsq.train.build), the data from nulsq.data, and the
numbers from the training loop's `evaluate`. On the device and batch size the run used, top-1 and
top-5 equal the run's final evaluation exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from nulsq import data as datasets
from nulsq.config import validate
from nulsq.errors import UserError
from nulsq.rundir import EVAL_FILE, build_checkpoint_model, checkpoint_config, resolve_checkpoint
from nulsq.train.checkpoint import atomic_write_json, load_checkpoint
from nulsq.train.distributed import DistInfo
from nulsq.train.loop import evaluate
from nulsq.train.runtime import resolve_runtime

TRUST_HINT = "--trust-checkpoint"


def evaluate_checkpoint(ref: str | Path, data_root: str | None = None, batch_size: int | None = None,
                        device: str | None = None, trust: bool = False,
                        out: Path | None = None) -> tuple[dict, Path]:
    """Evaluate a checkpoint; returns (the result, the eval.json written).

    Args:
        ref: a checkpoint file or a run directory.
        data_root: another dataset.root (the data moved, or another machine).
        batch_size: the evaluation batch size (default: the run's dataset.eval_batch_size).
        device: auto | cpu | cuda (default: the run's trainer.device).
        trust: read a checkpoint of nulsq before its safe format (see nulsq/safe_load.py).
        out: where the JSON goes (default: eval.json beside the checkpoint).
    """
    path = resolve_checkpoint(ref, runs_root=None, what=f"eval.py {ref}")
    ckpt = load_checkpoint(path, trust, TRUST_HINT)
    cfg = validate(checkpoint_config(path, ckpt))
    if batch_size is not None and batch_size <= 0:
        raise UserError(f"--batch-size must be > 0, got {batch_size}")
    for key, value in (("dataset.root", data_root), ("dataset.eval_batch_size", batch_size),
                       ("trainer.device", device)):
        if value is not None:
            OmegaConf.update(cfg, key, value)
    runtime = resolve_runtime(cfg.trainer)
    model = build_checkpoint_model(path, ckpt, cfg).to(runtime.device)
    if runtime.channels_last:  # as the trainer evaluates it (same kernels, same numbers)
        model = model.to(memory_format=torch.channels_last)
    if runtime.compile:
        model = torch.compile(model)
    bundle = datasets.build(cfg.dataset, runtime.device, cfg.trainer.seed)
    metrics = evaluate(model, bundle.val, runtime, DistInfo())
    result = {
        "checkpoint": str(path),
        "model": cfg.model.name,
        "method": cfg.quantizer.name if ckpt["stage"] == "qat" else "fp",
        "bits": cfg.quantizer.bits if ckpt["stage"] == "qat" else 32,
        "stage": ckpt["stage"],
        "step": int(ckpt.get("state", {}).get("step", 0)),
        "dataset": cfg.dataset.name,
        "split": f"held-out {cfg.dataset.val_split:g} of train" if cfg.dataset.val_split > 0 else "test",
        "device": str(runtime.device),
        "bf16": runtime.amp,
        "top1": metrics["val/top1"],
        "top5": metrics["val/top5"],
        "loss": metrics["val/loss"],
    }
    out = Path(out) if out is not None else path.parent / EVAL_FILE
    try:
        atomic_write_json(out, result)
    except OSError as err:
        raise UserError(f"cannot write {out} ({err.strerror}); pass --out with a writable path") from None
    return result, out
