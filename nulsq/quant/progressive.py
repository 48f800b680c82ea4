"""Progressive fine-tuning: a b-bit model's starting point from a trained (b+1)-bit run.

Supplement D-III: "merging two adjacent step sizes at (b+1)-bit yields effective initialization at
b-bit"; the pairs are (s_1 + s_2), (s_3 + s_4), ... (docs/maths.md, docs/fidelity.md B6), so every
second old level survives (`merge_adjacent`). At model level (`load_progressive`), network weights
and BN statistics are copied as they are, and each quantizer merges its own parameters from the
same layer's (b+1)-bit ones (`Quantizer.merge_from`, which for nuLSQ calls `merge_adjacent`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from nulsq.errors import UserError
from nulsq.quant.convert import quantizers
from nulsq.rundir import resolve_checkpoint
from nulsq.safe_load import load_torch_file


@torch.no_grad()
def merge_adjacent(steps: Tensor, new_count: int) -> Tensor:
    """New step k = old[2k] + old[2k+1] (0-based) for k < new_count; leftover old steps are dropped.

    The steps are counted outward from zero (as `pos_steps` / `neg_steps` of
    `nulsq.quant.functional.nulsq`), so the new levels cumsum(new) are the old levels 2, 4, 6, ...
    Example, positive side 3 -> 2 bits (Qp 7 -> 3):

        old steps  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  levels 0.1 0.3 0.6 1.0 1.5 2.1 2.8
        new steps  [0.3, 0.7, 1.1]                      levels     0.3     1.0     2.1

    The negative side (Qn 4 -> 2) merges the same way: [a, b, c, d] -> [a + b, c + d].

    Args:
        steps: 1-D old steps, innermost first.
        new_count: the number of steps wanted (Qp or Qn at the lower bit width), at least 1.

    Returns:
        A new 1-D tensor of `new_count` steps (detached, same dtype and device).

    Raises:
        ValueError: `steps` is not 1-D, `new_count` < 1, or fewer than 2 * new_count old steps.
    """
    if steps.dim() != 1:
        raise ValueError(f"steps must be 1-D, got shape {tuple(steps.shape)}")
    if new_count < 1:
        raise ValueError(f"new_count must be at least 1, got {new_count}")
    if steps.numel() < 2 * new_count:
        raise ValueError(
            f"cannot merge {steps.numel()} steps into {new_count}: need at least {2 * new_count}"
        )
    return steps[: 2 * new_count].detach().reshape(new_count, 2).sum(dim=1)


@torch.no_grad()
def load_progressive(model: nn.Module, ref: str | Path, trust: bool = False,
                     ckpt: dict | None = None) -> Path:
    """Initialise the quantized `model` from the (b+1)-bit run `ref`; returns the checkpoint used.

    Args:
        model: the quantized b-bit network.
        ref: a checkpoint file, a run directory or a run name (see rundir.resolve_checkpoint).
        trust: read a checkpoint of nulsq before its safe format (see nulsq/safe_load.py).
        ckpt: the contents of `ref`'s checkpoint when already read (the trainer's preflight read
            it: `nulsq.train.preflight.progressive_source`); None reads the file.
    """
    path = resolve_checkpoint(ref)
    if ckpt is None:
        ckpt = load_torch_file(path, "init.from_run checkpoint", "point init.from_run at another run",
                               trust)
    old = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(old, dict):
        raise UserError(f"init.from_run: {path} is not a nulsq checkpoint (no model entry)")
    qmods = quantizers(model)
    owned = {f"{name}.{p}" for name, q in qmods.items() for p, _ in q.named_parameters(recurse=False)}
    plain = {k: v for k, v in model.state_dict().items() if k not in owned}
    missing = [k for k in plain if k not in old and not _is_quantizer_buffer(k, qmods)]
    if missing:
        raise UserError(
            f"init.from_run: {path} does not match this model (missing {missing[:3]}); "
            f"it must be a run of the same model at one more bit"
        )
    model.load_state_dict({k: old[k] for k in plain if k in old}, strict=False)
    for name, q in qmods.items():
        mine = dict(q.named_parameters(recurse=False))
        if not mine:
            continue
        theirs = {p: old[f"{name}.{p}"] for p in mine if f"{name}.{p}" in old}
        if len(theirs) != len(mine):
            raise UserError(f"init.from_run: {path} has no quantizer parameters for layer '{name}'")
        q.merge_from({k: v.to(mine[k].device) for k, v in theirs.items()})
    return path


def _is_quantizer_buffer(key: str, qmods: dict) -> bool:
    return any(key.startswith(f"{name}.") for name in qmods)
