"""Step-size guard: non-positive or NaN step sizes stop the run (or are clamped), checked without
a per-forward host sync: one reduction over all layers at the log interval."""

from __future__ import annotations

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.convert import quantizers


class StepSizeError(UserError):
    """A step size became <= 0 or NaN (supplement: happens with plain SGD on nuLSQ)."""


def _guarded(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    out = []
    for name, q in quantizers(model).items():
        steps = q.step_sizes()
        if steps is not None:
            out.append((name, steps))
    return out


def check_step_sizes(model: nn.Module) -> None:
    """Raise StepSizeError naming the first layer whose step sizes are <= 0 or NaN (one sync)."""
    guarded = _guarded(model)
    if not guarded:
        return
    bad = torch.stack([~(s > 0).all() for _, s in guarded])  # NaN compares False, so it is bad
    if bool(bad.any()):  # the one host sync
        name, steps = guarded[int(bad.nonzero()[0, 0])]
        raise StepSizeError(
            f"step size of quantizer '{name}' became non-positive or NaN "
            f"({[round(v, 6) for v in steps.float().tolist()]}); lower optim.quant.lr, use "
            f"AdamW with init=mse or progressive init, or set quantizer.step_guard=clamp"
        )


@torch.no_grad()
def clamp_step_sizes(model: nn.Module, floor: float) -> None:
    """Clamp every learnable step to >= floor in place (NaN becomes floor); no host sync."""
    for q in quantizers(model).values():
        for p in q.step_parameters():
            torch.nan_to_num_(p, nan=floor)
            p.clamp_(min=floor)
