"""The ops as plain elementwise torch code and sums, for torch.compile to fuse with their neighbours.

An opaque kernel (a Triton op, a C custom op) costs its own pass over memory: under compile, a
pre-activation block would write BN+ReLU's output, read it back to quantize it, and write again.
Written as `where` chains and masked sums instead, inductor folds the forward into the BN+ReLU
kernel and the step-gradient sums into the backward's reductions. `functional` routes the ops here
while torch.compile traces (the "compile" pseudo device type of `register_fast_path`).

The grid is built from scalar ops on the steps (no cumsum, no lookup tables) so that inductor
inlines it into the fused kernel. Levels are the steps' prefix sums accumulated in float64 and
rounded to fp32, thresholds c - s/2 in fp32, negative ones an ulp down (ties toward zero): the
same numbers as `functional.nulsq_grid`, so both classify every x alike. Grids of more than
`MAX_INTERVALS` intervals (5 bits and up, rare as activations) take the reference kernels, whose
single bucketize beats a chain of hundreds of compares.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from nulsq.quant import functional as F

MAX_INTERVALS = 15  # 4 bits


class _Grid(NamedTuple):
    levels: list[Tensor]  # L_0 < ... < L_N, fp32 scalars
    thresholds: list[Tensor]  # t_1 .. t_N, between L_{j-1} and L_j
    widths: Tensor  # (N,) the step of each interval, ascending order


def _grid(pos_steps: Tensor, neg_steps: Tensor | None) -> _Grid:
    pos = pos_steps.reshape(-1)
    neg = pos.new_zeros(0) if neg_steps is None else neg_steps.reshape(-1)
    levels, thresholds = [], []
    below = torch.full((), -float("inf"), device=pos.device)
    c = torch.zeros((), dtype=torch.float64, device=pos.device)
    for k in range(neg.numel()):  # outward from zero; prepended, so the list stays ascending
        s = neg[k].float()
        c = c + s.double()
        level = c.float()
        levels.insert(0, -level)
        thresholds.insert(0, torch.nextafter(-(level - s / 2), below))
    levels.append(torch.zeros((), device=pos.device))
    c = torch.zeros((), dtype=torch.float64, device=pos.device)
    for k in range(pos.numel()):
        s = pos[k].float()
        c = c + s.double()
        levels.append(c.float())
        thresholds.append(levels[-1] - s / 2)
    return _Grid(levels, thresholds, torch.cat([neg.flip(0), pos]).float())


def _quantize(xf: Tensor, grid: _Grid) -> Tensor:
    """Eq. 5: each x to its level (x above threshold t_j moves up to L_j)."""
    y = torch.where(xf > grid.thresholds[0], grid.levels[1], grid.levels[0])
    for j in range(1, len(grid.thresholds)):
        y = torch.where(xf > grid.thresholds[j], grid.levels[j + 1], y)
    return y


def _intervals(pos_steps: Tensor, neg_steps: Tensor | None) -> int:
    return pos_steps.numel() + (0 if neg_steps is None else neg_steps.numel())


def nulsq_forward(x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None) -> Tensor:
    """`functional.nulsq_forward_reference` as a chain of `where`s (same arguments and result)."""
    if _intervals(pos_steps, neg_steps) > MAX_INTERVALS:
        return F.nulsq_forward_reference(x, pos_steps, neg_steps)
    return F.cast(_quantize(x.float(), _grid(pos_steps, neg_steps)), x.dtype)


def nulsq_backward(
    dy: Tensor,
    x: Tensor,
    pos_steps: Tensor,
    neg_steps: Tensor | None,
    grad_scale: float,
    need_x: bool = True,
    need_steps: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`functional.nulsq_backward_reference` as masked sums: per interval, sum(dy * (y - x))
    over its interior divided by its width (Eq. 11/13); sum(dy) beyond each clip point (Eq. 10/12).
    """
    if _intervals(pos_steps, neg_steps) > MAX_INTERVALS:
        return F.nulsq_backward_reference(
            dy, x, pos_steps, neg_steps, grad_scale, need_x, need_steps
        )
    grid = _grid(pos_steps, neg_steps)
    xf, d = x.float(), dy.float()
    lo, hi = grid.levels[0], grid.levels[-1]
    dx = F.cast(torch.where((xf >= lo) & (xf <= hi), d, 0.0), x.dtype) if need_x else None
    if not need_steps:
        return dx, None, None
    g = d * (_quantize(xf, grid) - xf)  # zero on the levels themselves
    interior = torch.stack(
        [
            torch.where((xf > a) & (xf < b), g, 0.0).sum()
            for a, b in zip(grid.levels[:-1], grid.levels[1:])
        ]
    )
    above = torch.where(xf >= hi, d, 0.0).sum()
    below = None if neg_steps is None else torch.where(xf <= lo, d, 0.0).sum()
    dpos, dneg = F.nulsq_step_gradients(interior, grid.widths, above, below, pos_steps, neg_steps,
                                        grad_scale)
    return dx, dpos, dneg


# LSQ's reference kernels are already elementwise code and one sum.
KERNELS = {
    "lsq": F.Kernel(F.lsq_forward_reference, F.lsq_backward_reference),
    "nulsq": F.Kernel(nulsq_forward, nulsq_backward),
}
