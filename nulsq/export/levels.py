"""Level tables and decision thresholds of trained quantizers, read through the Quantizer API.

Every quantizer of nulsq maps x to one of finitely many levels L_0 < ... < L_(n-1) (its `levels()`),
through a nondecreasing step function. An integer implementation stores, per quantizer:
- the level table and a *code* per level: integers code_min .. code_min + n - 1, where code_min is
  0 for unsigned grids and -(n // 2) for signed ones (so -Qn .. Qp for a 2^b-level grid, and
  -(2^(b-1) - 1) .. 2^(b-1) - 1 for the odd, symmetric grids of APoT and ternary weights);
- the n - 1 decision thresholds t_i: x gets code code_min + #{i : t_i <= x}.

The level values stored are the ones the trained fake quantizer outputs (checked against its
`levels()`), so a runtime that looks them up reproduces the fake-quant values bit for bit where
the quantizer outputs exactly its levels (LSQ, nuLSQ).

The thresholds are not derived from each paper's formula but measured on the quantizer itself:
t_i is the smallest float32 x whose fake-quantized value lies above the midpoint of L_i and
L_(i+1), found by bisection over the ordered float32 values. So the codes an integer runtime
computes by comparisons are the fake-quant model's, bit for bit, ties included, whatever the kind.

The dynamic 8-bit quantizer (first/last layers) has no fixed levels: its step is max|x| / Qp of
the tensor it receives. Its table is in units of that step (levels = the codes, thresholds on
x / step, measured on the rounding of `nulsq.quant.functional.lsq` with step 1), and the runtime
computes the step from its input, as the fake-quant model does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from nulsq.quant import functional as F
from nulsq.quant.base import Quantizer
from nulsq.quant.quantizers import DynamicMaxQuantizer

# A level table is uniform when every level is within this fraction of the largest |level| of
# code * step: the runtime then accumulates integer codes and multiplies by the step once.
UNIFORM_RTOL = 1e-6
# Fake-quantized values must be the quantizer's levels() to this fraction of the largest |level|.
LEVEL_MATCH_RTOL = 1e-5


@dataclass
class QuantTable:
    """What an integer implementation needs of one quantizer.

    Attributes:
        kind, bits, signed: the quantizer's.
        code_min: the code of levels[0]; codes run up to code_min + len(levels) - 1.
        levels: (n,) ascending fp32 level values (dynamic: the codes themselves, in units of the step).
        thresholds: (n-1,) fp32; x gets code code_min + #{t <= x} (dynamic: compare x / step);
            empty for weights, whose codes are stored.
        step: the step when levels == code * step (uniform grids), else None.
        dynamic: the step is computed from each input tensor at run time.
        convention: for dynamic tables, DynamicMaxQuantizer's: "absmax" (step max|x| / Qp, codes
            clamped to the table) or "authors" (m = max(x), code = round(x / m * Qp) unclamped,
            value code / Qp * m in that order); None otherwise.
        qp: the Qp of a dynamic table (the divisor of its codes).
    """

    kind: str
    bits: int
    signed: bool
    code_min: int
    levels: torch.Tensor
    thresholds: torch.Tensor
    step: float | None
    dynamic: bool = False
    convention: str | None = None
    qp: int | None = None

    @property
    def code_max(self) -> int:
        return self.code_min + self.levels.numel() - 1

    def describe(self) -> dict:
        """The manifest entry (JSON): floats as float32 values written exactly."""
        return {
            "kind": self.kind, "bits": self.bits, "signed": self.signed,
            "code_min": self.code_min, "code_max": self.code_max,
            "uniform": self.step is not None or self.dynamic, "step": self.step,
            "dynamic": self.dynamic, "convention": self.convention, "qp": self.qp,
            "levels": None if self.dynamic else self.levels.tolist(),
            "thresholds": self.thresholds.tolist(),
        }


def code_min_for(num_levels: int, signed: bool) -> int:
    """0 for unsigned grids, -(n // 2) for signed ones (see the module docstring)."""
    return -(num_levels // 2) if signed else 0


def uniform_step(levels: torch.Tensor, code_min: int) -> float | None:
    """The step s if levels[i] == (code_min + i) * s (to UNIFORM_RTOL), else None."""
    if levels.numel() < 2 or code_min > 0 or code_min + levels.numel() - 1 < 1:
        return None
    step = levels[1 - code_min] - levels[-code_min]  # the level of code 1 minus that of code 0
    codes = torch.arange(code_min, code_min + levels.numel(), dtype=torch.float32)
    error = (codes * step - levels).abs().max()
    return float(step) if step > 0 and error <= UNIFORM_RTOL * levels.abs().max() else None


# -- float32 <-> an integer key with the same order (for bisection over every float32 value) -------

def _key(x: torch.Tensor) -> torch.Tensor:
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))  # -0.0 and +0.0 share key 0


def _value(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key >= 0, key, (-key) | 0x80000000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # as a signed 32-bit pattern
    return bits.to(torch.int32).view(torch.float32)


@torch.no_grad()
def decision_thresholds(quantize: Callable[[torch.Tensor], torch.Tensor],
                        levels: torch.Tensor) -> torch.Tensor:
    """For each pair of adjacent levels, the smallest float32 x with quantize(x) above their midpoint.

    Args:
        quantize: an elementwise, nondecreasing fake quantizer of 1-D fp32 tensors.
        levels: (n,) its ascending levels.
    """
    levels = levels.float().cpu()
    mids = (levels[1:] + levels[:-1]) / 2
    reach = float(levels.abs().max()) * 4 + 1
    lo = _key(torch.full_like(mids, -reach))
    hi = _key(torch.full_like(mids, reach))
    # Invariant: quantize(value(lo)) <= mid < quantize(value(hi)).
    if not (bool((quantize(_value(lo)) <= mids).all()) and bool((quantize(_value(hi)) > mids).all())):
        raise RuntimeError("export: a quantizer's outputs do not span its levels(); cannot place "
                           "its decision thresholds")
    while bool((hi - lo > 1).any()):
        middle = (lo + hi) // 2
        above = quantize(_value(middle)).float() > mids
        hi, lo = torch.where(above, middle, hi), torch.where(above, lo, middle)
    return _value(hi)


@torch.no_grad()
def activation_table(q: Quantizer) -> QuantTable:
    """The table of an activation quantizer (in eval mode: LQ-Nets fits no basis then)."""
    if isinstance(q, DynamicMaxQuantizer):
        codes = torch.arange(-q.qn, q.qp + 1, dtype=torch.float32)
        one = torch.ones(())
        thresholds = decision_thresholds(lambda u: F.lsq(u, one, q.qn, q.qp), codes)
        return QuantTable(q.kind, q.bits, q.signed, -q.qn, codes, thresholds, None, dynamic=True,
                          convention=q.convention, qp=q.qp)
    levels = q.levels().detach().float().cpu()
    code_min = code_min_for(levels.numel(), q.signed)
    quantize = lambda x: q(x).float()  # noqa: E731  (q on the CPU, in eval mode)
    thresholds = decision_thresholds(quantize, levels)
    # The table holds the values the fake quantizer outputs in each cell (at the cell's first x),
    # bit for bit: e.g. nuLSQ's cumulative sums as its kernels round them, not as levels() does.
    first_of_cell = torch.cat([torch.full((1,), -(float(levels.abs().max()) * 4 + 1)), thresholds])
    measured = quantize(first_of_cell)
    _check_close(measured, levels, levels, q.kind)
    levels = measured
    return QuantTable(q.kind, q.bits, q.signed, code_min, levels, thresholds,
                      uniform_step(levels, code_min))


def _check_close(measured: torch.Tensor, expected: torch.Tensor, levels: torch.Tensor, kind: str) -> None:
    """A quantizer whose outputs are not its levels() is one this exporter does not understand."""
    error = float((measured - expected).abs().max()) if expected.numel() else 0.0
    if error > LEVEL_MATCH_RTOL * float(levels.abs().max()):
        raise RuntimeError(f"export: quantizer '{kind}' gives values {error:.3g} away from its "
                           f"levels(); cannot code them")


@torch.no_grad()
def weight_table(q: Quantizer, weight: torch.Tensor) -> tuple[QuantTable, torch.Tensor]:
    """(table, integer codes of `weight`, int64 in weight's shape) of a weight quantizer.

    The codes are those of the fake-quantized weight q(weight), matched to the nearest level; a
    fake-quantized value that is not one of `levels()` is an error (a quantizer this exporter
    does not understand), never silently rounded.
    """
    wq = q(weight.detach()).float().cpu()
    if isinstance(q, DynamicMaxQuantizer) and q.convention == "authors":
        return _authors_dynamic_weight_table(q, weight)
    if isinstance(q, DynamicMaxQuantizer):  # a weight is constant: its dynamic step is fixed
        codes = torch.arange(-q.qn, q.qp + 1, dtype=torch.float32)
        levels = codes * q.step_of(weight).cpu()
    else:
        levels = q.levels().detach().float().cpu()  # after q(weight): LCQ/DoReFa scales are set
    code_min = code_min_for(levels.numel(), q.signed)
    index = torch.bucketize(wq, (levels[1:] + levels[:-1]) / 2)
    _check_close(levels[index], wq, levels, q.kind)
    # The table holds the fake-quantized weight values themselves (bit for bit) where a code occurs.
    levels = levels.clone().scatter_(0, index.reshape(-1), wq.reshape(-1))
    no_thresholds = torch.empty(0)  # the codes are stored: nothing to compare at run time
    table = QuantTable(q.kind, q.bits, q.signed, code_min, levels, no_thresholds,
                       uniform_step(levels, code_min))
    return table, index + code_min


def _authors_dynamic_weight_table(q: DynamicMaxQuantizer, weight: torch.Tensor
                                  ) -> tuple[QuantTable, torch.Tensor]:
    """The authors' 8-bit weight quantizer: code = round(w / m * Qp) with m = max(w) and no clamp,
    so a weight whose most negative value exceeds its maximum in magnitude has codes below -Qp;
    the table then spans them (and packs to as many bits as that takes, 9 instead of 8)."""
    m = q.max_of(weight).cpu()
    codes = weight.detach().float().cpu().div(m).mul(q.qp).round()
    code_min = min(int(codes.min()), -q.qn)
    grid = torch.arange(code_min, q.qp + 1, dtype=torch.float32)
    levels = grid.div(q.qp).mul(m)  # the fake quantizer's values, in its order of operations
    bits = max(q.bits, int(math.ceil(math.log2(grid.numel()))))
    table = QuantTable(q.kind, bits, q.signed, code_min, levels, torch.empty(0), float(m / q.qp),
                       convention="authors", qp=q.qp)
    return table, codes.to(torch.int64)
