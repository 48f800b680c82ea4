"""CPU fast path for the rival quantizers: the C kernels of cpu_rivals.c, in the library that
cpu_quant builds (same build, cache and fallback).

The rivals' autograd Functions ask `ready(x)` in their forward: True in eager mode on the CPU for
fp32/bf16 input while the CPU fast path is enabled (`nulsq.quant.kernels.enabled()`, so
NULSQ_FAST_KERNELS=0 and `kernels.disable()` switch these off too) and the library is built.
Otherwise they run their torch code, which is also what torch.compile traces and fuses.

The small tables (levels, the compander's coefficients) come from the callers in fp32: the C
code only walks the elements. Each wrapper returns what the torch code it replaces returns.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from nulsq.quant import kernels
from nulsq.quant.kernels import cpu_quant, dense, like
from nulsq.quant.kernels.cpu_quant import DTYPE_CODES, contiguous_f32

# Quantizer kinds that train slower under torch.compile on the CPU than eager with these kernels
# (pre-act ResNet-20 b32, 2 threads, x the compiled FP step: APoT 1.5, LQ-Nets 4.3, LCQ 7.9;
# inductor's CPU loops redo small-table maths per vector and scatter with atomics). The trainer
# says so in one line when a run asks for that.
EAGER_FASTER_ON_CPU = ("apot", "lcq", "lqnets", "ternary")
MAX_LEVELS = 512  # MAX_N + 1 in the C source: magnitudes, thresholds + 1
_LIB: ctypes.CDLL | None = None


def _library() -> ctypes.CDLL | None:
    """cpu_quant's library with the rival kernels' signatures declared (once)."""
    global _LIB
    if _LIB is None:
        lib = cpu_quant.library()
        if lib is None:
            return None
        p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.project_forward.argtypes = [p, p, i64, i32, p, p, i32, i32, i32]
        lib.project_backward.argtypes = [p, p, p, i64, i32, p, p, i32, i32, i32, p, i32]
        lib.lcq_forward.argtypes = [p, p, i64, i32, p, p, p, i32, p, i32, f32, i32, i32]
        lib.lcq_backward.argtypes = [p, p, p, i64, i32, p, p, p, i32, p, i32, f32, i32, p, p, p,
                                     i32]
        lib.level_stats.argtypes = [p, i64, i32, p, i32, p, p, i32]
        lib.pact_backward.argtypes = [p, p, p, i64, i32, p, i32, p, i32]
        lib.nearest_forward.argtypes = [p, p, i64, i32, p, i32, i32]
        for fn in (lib.project_forward, lib.project_backward, lib.lcq_forward, lib.lcq_backward,
                   lib.level_stats, lib.pact_backward, lib.nearest_forward):
            fn.restype = None
        _LIB = lib
    return _LIB


def ready(x: Tensor, table: int = 0) -> bool:
    """True when the C kernels serve x (eager, CPU, fp32/bf16, CPU fast path on and built) with
    a level table of `table` entries (at most MAX_LEVELS)."""
    return (
        table <= MAX_LEVELS
        and x.dtype in DTYPE_CODES
        and x.is_cpu
        and x.numel() > 0
        and not torch.compiler.is_compiling()
        and "cpu" in kernels.enabled()
        and _library() is not None
    )


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def project_forward(x: Tensor, alpha: Tensor, magnitudes: Tensor, signed: bool) -> Tensor:
    """alpha P(clamp(x / alpha)) (clip_base.clip_project's value), P onto +-magnitudes."""
    x = dense(x.detach())
    y, a, m = torch.empty_like(x), contiguous_f32(alpha), contiguous_f32(magnitudes)
    _LIB.project_forward(x.data_ptr(), y.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], a.data_ptr(),
                         m.data_ptr(), m.numel(), int(signed), torch.get_num_threads())
    return y


def project_backward(dy: Tensor, x: Tensor, alpha: Tensor, magnitudes: Tensor, signed: bool,
                     clipped: bool, need_alpha: bool) -> tuple[Tensor, Tensor | None]:
    """(dx, dL/dalpha as a 0-d fp32 tensor or None) of clip_project (APoT's RCF gradients)."""
    x = dense(x.detach())
    dy, a, m = like(dy, x), contiguous_f32(alpha), contiguous_f32(magnitudes)
    dx = torch.empty_like(x)
    dalpha = torch.empty((), dtype=torch.float32) if need_alpha else None
    _LIB.project_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), DTYPE_CODES[x.dtype],
                          a.data_ptr(), m.data_ptr(), m.numel(), int(signed), int(clipped),
                          _ptr(dalpha), torch.get_num_threads())
    return dx, dalpha


def pact_backward(dy: Tensor, x: Tensor, alpha: Tensor, signed: bool, need_alpha: bool
                  ) -> tuple[Tensor, Tensor | None]:
    """(dx, dL/dalpha as a 0-d fp32 tensor or None) of PACT's clip (rivals/pact.py)."""
    x = dense(x.detach())
    dy, a = like(dy, x), contiguous_f32(alpha)
    dx = torch.empty_like(x)
    dalpha = torch.empty((), dtype=torch.float32) if need_alpha else None
    _LIB.pact_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), DTYPE_CODES[x.dtype],
                       a.data_ptr(), int(signed), _ptr(dalpha), torch.get_num_threads())
    return dx, dalpha


def nearest_forward(x: Tensor, levels: Tensor) -> Tensor:
    """The nearest of the ascending `levels` (at most MAX_LEVELS) for every element of x; ties
    to the lower level (rivals/lqnets.nearest)."""
    x = dense(x.detach())
    y, lv = torch.empty_like(x), contiguous_f32(levels)
    _LIB.nearest_forward(x.data_ptr(), y.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], lv.data_ptr(),
                         lv.numel(), torch.get_num_threads())
    return y


class CompanderTables:
    """What the LCQ kernels read, in fp32: the coefficients of L g(v) = c_k + s_k (v K) per input
    interval, the output levels alpha g^-1(q / L), and the largest fp32 below 1."""

    def __init__(self, intercepts: Tensor, slopes_vk: Tensor, outputs: Tensor, below_one: float
                 ) -> None:
        self.intercepts, self.slopes_vk = contiguous_f32(intercepts), contiguous_f32(slopes_vk)
        self.outputs, self.below_one = contiguous_f32(outputs), below_one

    def args(self) -> tuple:
        return (self.intercepts.data_ptr(), self.slopes_vk.data_ptr(), self.intercepts.numel(),
                self.outputs.data_ptr(), self.outputs.numel() - 1, self.below_one)


def lcq_forward(x: Tensor, alpha: Tensor, tables: CompanderTables, signed: bool) -> Tensor:
    """LCQ's compander output y (rivals/lcq.py) for x."""
    x = dense(x.detach())
    y, a = torch.empty_like(x), contiguous_f32(alpha)
    _LIB.lcq_forward(x.data_ptr(), y.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], a.data_ptr(),
                     *tables.args(), int(signed), torch.get_num_threads())
    return y


def lcq_backward(dy: Tensor, x: Tensor, alpha: Tensor, tables: CompanderTables, signed: bool,
                 ratio: Tensor | None, need_cells: bool
                 ) -> tuple[Tensor, Tensor, Tensor | None]:
    """(dx, [sum(dy y), sum(dx x)] in float64, the cells' sums (2, K, L + 1) in float64 or None).

    ratio: None under the authors' STE (dx = dy inside), else the (K, L + 1) factors of dx per
    (input interval, level). The cells hold, per (k, q), the sums of w = dy sign(x) over the
    inside of the clip range and of w t (t = |x| / alpha)."""
    x = dense(x.detach())
    dy, a = like(dy, x), contiguous_f32(alpha)
    k_count, levels = tables.intercepts.numel(), tables.outputs.numel()
    dx = torch.empty_like(x)
    sums = torch.empty(2, dtype=torch.float64)
    cells = torch.empty(2, k_count, levels, dtype=torch.float64) if need_cells else None
    ratio = contiguous_f32(ratio)
    _LIB.lcq_backward(dy.data_ptr(), x.data_ptr(), dx.data_ptr(), x.numel(), DTYPE_CODES[x.dtype],
                      a.data_ptr(), *tables.args(), int(signed), _ptr(ratio), sums.data_ptr(),
                      _ptr(cells), torch.get_num_threads())
    return dx, sums, cells


def level_stats(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """(counts, sums) in float64 of the elements of x nearest to each of the ascending `levels`
    (level j: mid_(j-1) < x <= mid_j, the midpoints between levels), as
    rivals/lqnets.counts_and_sums."""
    x = dense(x.detach())
    lv = contiguous_f32(levels)
    counts = torch.empty(lv.numel(), dtype=torch.float64)
    sums = torch.empty_like(counts)
    _LIB.level_stats(x.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], lv.data_ptr(), lv.numel(),
                     counts.data_ptr(), sums.data_ptr(), torch.get_num_threads())
    return counts, sums
