"""Triton fast path for `lsq` and `nulsq` on CUDA: one pass forward, one pass backward.

Forward reads x once and writes y. Backward reads x and dy once, writes dx, and leaves per-block
partial sums of the step gradients in a [num_blocks, bins] fp32 buffer that a small torch sum
finishes: no atomics, no host synchronisation, so the ops run inside CUDA graphs. Inputs fp32 or
bf16, arithmetic in fp32.

The nuLSQ grid (levels, thresholds with ties toward zero, interval widths) comes from
`functional.nulsq_grid`, the reference's own tables, so both paths classify every x identically
(a handful of tiny ops, which inductor fuses under torch.compile). Each kernel reads them as:
threshold t_j (j = 0..N-1, N = Qn + Qp intervals) = boundaries[2 + 2j], level L_k (k = 0..N) =
level_of_cell[2k + 1]. Grids of up to `_LINEAR_MAX` intervals (2-4 bits) are classified with N
compares per element; wider ones by a binary search over the thresholds.

The ops are `torch.library.triton_op`s, so that with NULSQ_COMPILE_FUSION=0 torch.compile can
trace into them and launch the kernels from its generated code (by default, compiled graphs use
the `fusable` formulation instead, which inductor fuses with the neighbouring layers). Under
TRITON_INTERPRET=1 (set before importing this module) the same kernels run on CPU tensors, which
is how the CPU-only tests check them.
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from nulsq.quant import functional as F
from nulsq.quant.kernels import dense, like

_BLOCK = 4096  # elements per program: 16 per thread at 8 warps, 128-bit loads
_WARPS = 8
_LINEAR_MAX = 15  # up to 4 bits: N compares beat a search of log2(N+1) dependent gathers
_DTYPES = (torch.float32, torch.bfloat16)


@triton.jit
def _round_even(v):
    """rint (half to even) of |v| <= 2^22, as torch.round: rint(-0.3) = -0.0 (v * 0 keeps signs)."""
    r = (v + 12582912.0) - 12582912.0
    return tl.where(r == 0.0, v * 0.0, r)


@triton.jit
def _clamp(v, lo, hi):
    """clamp that lets NaN through, like torch.clamp."""
    v = tl.where(v < lo, lo, v)
    return tl.where(v > hi, hi, v)


@triton.jit
def _offsets(n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < n


# -- LSQ (supplement Eq. 1 and 4) ----------------------------------------------------------------


@triton.jit
def _lsq_fwd_kernel(x_ptr, y_ptr, step_ptr, n, lo, hi, BLOCK: tl.constexpr):
    """lo = -Qn, hi = Qp (fp32 runtime values: one compiled kernel serves every bit width)."""
    offs, live = _offsets(n, BLOCK)
    s = tl.load(step_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    v = _clamp(tl.math.div_rn(x.to(tl.float32), s), lo, hi)
    tl.store(y_ptr + offs, (_round_even(v) * s).to(x.dtype), mask=live)


@triton.jit
def _lsq_bwd_kernel(dy_ptr, x_ptr, dx_ptr, partial_ptr, step_ptr, n, lo, hi,
                    NEED_X: tl.constexpr, NEED_STEP: tl.constexpr, BLOCK: tl.constexpr):
    offs, live = _offsets(n, BLOCK)
    s = tl.load(step_ptr).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    d = tl.load(dy_ptr + offs, mask=live, other=0.0).to(tl.float32)
    v = tl.math.div_rn(x.to(tl.float32), s)
    if NEED_X:
        tl.store(dx_ptr + offs, tl.where((v >= lo) & (v <= hi), d, 0.0).to(x.dtype), mask=live)
    if NEED_STEP:
        # Eq. 4: -Qn / Qp on the (closed) clip branches = round of the clamped value; rint(v) - v
        # strictly between.
        g = _round_even(_clamp(v, lo, hi)) - tl.where((v > lo) & (v < hi), v, 0.0)
        tl.store(partial_ptr + tl.program_id(0), tl.sum(tl.where(live, d * g, 0.0), axis=0))


# -- nuLSQ (supplement Eq. 5 and 10-12) ----------------------------------------------------------


@triton.jit
def _classify(x, bnd_ptr, lvl_ptr, N: tl.constexpr, LINEAR: tl.constexpr,
              SEARCH_STEPS: tl.constexpr):
    """(y, k): the level of each x and its index k = the number of thresholds below x."""
    if LINEAR:
        y = tl.zeros(x.shape, tl.float32) + tl.load(lvl_ptr + 1)
        k = tl.zeros(x.shape, tl.int32)
        for j in tl.static_range(N):
            above = x > tl.load(bnd_ptr + 2 + 2 * j)
            y = tl.where(above, tl.load(lvl_ptr + 2 * j + 3), y)
            k += above.to(tl.int32)
    else:
        k = tl.zeros(x.shape, tl.int32)
        for i in tl.static_range(SEARCH_STEPS):
            h = 1 << (SEARCH_STEPS - 1 - i)
            j = k + h - 1
            t = tl.load(bnd_ptr + 2 + 2 * j, mask=j < N, other=float("inf"))
            k += tl.where(x > t, h, 0)
        y = tl.load(lvl_ptr + 2 * k + 1)
    return y, k


@triton.jit
def _nulsq_fwd_kernel(x_ptr, y_ptr, bnd_ptr, lvl_ptr, n, N: tl.constexpr, LINEAR: tl.constexpr,
                      SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    offs, live = _offsets(n, BLOCK)
    x = tl.load(x_ptr + offs, mask=live, other=0.0)
    y, _ = _classify(x.to(tl.float32), bnd_ptr, lvl_ptr, N, LINEAR, SEARCH_STEPS)
    tl.store(y_ptr + offs, y.to(x.dtype), mask=live)


@triton.jit
def _nulsq_bwd_kernel(dy_ptr, x_ptr, dx_ptr, partial_ptr, bnd_ptr, lvl_ptr, n, N: tl.constexpr,
                      LINEAR: tl.constexpr, SEARCH_STEPS: tl.constexpr, NEED_X: tl.constexpr,
                      NEED_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """partial[pid]: [0] sum dy over x <= L_0, [1..N] sum dy * (y - x) over interval i's
    interior, [N+1] sum dy over x >= L_N."""
    offs, live = _offsets(n, BLOCK)
    xr = tl.load(x_ptr + offs, mask=live, other=0.0)
    x = xr.to(tl.float32)
    d = tl.load(dy_ptr + offs, mask=live, other=0.0).to(tl.float32)
    lo = tl.load(lvl_ptr + 1)
    hi = tl.load(lvl_ptr + 2 * N + 1)
    if NEED_X:
        tl.store(dx_ptr + offs, tl.where((x >= lo) & (x <= hi), d, 0.0).to(xr.dtype), mask=live)
    if NEED_STEPS:
        y, k = _classify(x, bnd_ptr, lvl_ptr, N, LINEAR, SEARCH_STEPS)
        row = partial_ptr + tl.program_id(0).to(tl.int64) * (N + 2)
        tl.store(row, tl.sum(tl.where(live & (x <= lo), d, 0.0), axis=0))
        tl.store(row + N + 1, tl.sum(tl.where(live & (x >= hi), d, 0.0), axis=0))
        # x above its level lies in the next interval (x == a level contributes 0 anyway)
        interval = k + (x > y).to(tl.int32)
        g = tl.where(live & (x > lo) & (x < hi), d * (y - x), 0.0)
        if LINEAR:
            for i in tl.static_range(1, N + 1):
                tl.store(row + i, tl.sum(tl.where(interval == i, g, 0.0), axis=0))
        else:
            for i in tl.range(1, N + 1):
                tl.store(row + i, tl.sum(tl.where(interval == i, g, 0.0), axis=0))


# -- the ops (traceable by torch.compile; typing.Tuple for older torch's schema inference) -------


def _blocks(n: int) -> int:
    return max(1, triton.cdiv(n, _BLOCK))


def _search_steps(intervals: int) -> int:
    return max(1, intervals.bit_length())  # 2^steps >= intervals + 1


@triton_op("nulsq_triton::lsq_forward", mutates_args=())
def _lsq_forward_op(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    y = torch.empty_like(x)
    wrap_triton(_lsq_fwd_kernel)[(_blocks(x.numel()),)](
        x, y, step, x.numel(), float(-qn), float(qp), BLOCK=_BLOCK, num_warps=_WARPS
    )
    return y


@triton_op("nulsq_triton::lsq_backward", mutates_args=())
def _lsq_backward_op(dy: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, need_x: bool,
                     need_step: bool) -> Tuple[Tensor, Tensor]:
    blocks = _blocks(x.numel())
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    partial = torch.empty(blocks if need_step else 0, device=x.device, dtype=torch.float32)
    wrap_triton(_lsq_bwd_kernel)[(blocks,)](
        dy, x, dx, partial, step, x.numel(), float(-qn), float(qp), NEED_X=need_x,
        NEED_STEP=need_step, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return dx, partial


@triton_op("nulsq_triton::nulsq_forward", mutates_args=())
def _nulsq_forward_op(x: Tensor, boundaries: Tensor, level_of_cell: Tensor) -> Tensor:
    intervals = (level_of_cell.numel() - 4) // 2
    y = torch.empty_like(x)
    wrap_triton(_nulsq_fwd_kernel)[(_blocks(x.numel()),)](
        x, y, boundaries, level_of_cell, x.numel(), N=intervals, LINEAR=intervals <= _LINEAR_MAX,
        SEARCH_STEPS=_search_steps(intervals), BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return y


@triton_op("nulsq_triton::nulsq_backward", mutates_args=())
def _nulsq_backward_op(dy: Tensor, x: Tensor, boundaries: Tensor, level_of_cell: Tensor,
                       need_x: bool, need_steps: bool) -> Tuple[Tensor, Tensor]:
    intervals = (level_of_cell.numel() - 4) // 2
    blocks = _blocks(x.numel())
    dx = torch.empty_like(x) if need_x else x.new_empty(0)
    partial = torch.empty((blocks if need_steps else 0, intervals + 2), device=x.device,
                          dtype=torch.float32)
    wrap_triton(_nulsq_bwd_kernel)[(blocks,)](
        dy, x, dx, partial, boundaries, level_of_cell, x.numel(), N=intervals,
        LINEAR=intervals <= _LINEAR_MAX, SEARCH_STEPS=_search_steps(intervals), NEED_X=need_x,
        NEED_STEPS=need_steps, BLOCK=_BLOCK, num_warps=_WARPS,
    )
    return dx, partial


# -- the Kernel pair functional.py dispatches to (the reference kernels' signatures) -------------


def _supported(x: Tensor) -> bool:
    return x.dtype in _DTYPES and x.numel() > 0


def lsq_forward(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """`functional.lsq_forward_reference` in one pass (same arguments and result)."""
    if not _supported(x):
        return F.lsq_forward_reference(x, step, qn, qp)
    return _lsq_forward_op(dense(x), step.detach().float().reshape(1), qn, qp)


def lsq_backward(dy: Tensor, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float,
                 need_x: bool = True, need_step: bool = True
                 ) -> tuple[Tensor | None, Tensor | None]:
    """`functional.lsq_backward_reference` in one pass: dx and per-block sums of dy * G."""
    if not _supported(x):
        return F.lsq_backward_reference(dy, x, step, qn, qp, grad_scale, need_x, need_step)
    x = dense(x)
    dx, partial = _lsq_backward_op(like(dy, x), x, step.detach().float().reshape(1), qn, qp,
                                   need_x, need_step)
    dstep = None
    if need_step:
        dstep = F.cast((partial.sum() * grad_scale).reshape(step.shape), step.dtype)
    return (dx if need_x else None), dstep


def nulsq_forward(x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None) -> Tensor:
    """`functional.nulsq_forward_reference` in one pass (same arguments and result)."""
    if not _supported(x):
        return F.nulsq_forward_reference(x, pos_steps, neg_steps)
    grid = F.nulsq_grid(pos_steps.detach(), None if neg_steps is None else neg_steps.detach())
    return _nulsq_forward_op(dense(x), grid.boundaries, grid.level_of_cell)


def nulsq_backward(dy: Tensor, x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None,
                   grad_scale: float, need_x: bool = True, need_steps: bool = True
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """`functional.nulsq_backward_reference` in one pass, then a small sum of block partials.

    Interior gradient of interval i: sum(dy * (y - x)) / width_i (Eq. 11/13); clip branches:
    +sum(dy) over x >= c_Qp for every s_k, -sum(dy) over x <= -c'_Qn for every s'_k (Eq. 10/12).
    """
    if not _supported(x):
        return F.nulsq_backward_reference(dy, x, pos_steps, neg_steps, grad_scale, need_x,
                                          need_steps)
    neg = None if neg_steps is None else neg_steps.detach()
    grid = F.nulsq_grid(pos_steps.detach(), neg)
    x = dense(x)
    dx, partial = _nulsq_backward_op(like(dy, x), x, grid.boundaries, grid.level_of_cell,
                                     need_x, need_steps)
    dpos = dneg = None
    if need_steps:
        sums = partial.sum(0)
        dpos, dneg = F.nulsq_step_gradients(sums[1:-1], grid.widths, sums[-1], sums[0], pos_steps,
                                            neg_steps, grad_scale)
    return (dx if need_x else None), dpos, dneg


KERNELS = {
    "lsq": F.Kernel(lsq_forward, lsq_backward),
    "nulsq": F.Kernel(nulsq_forward, nulsq_backward),
}
