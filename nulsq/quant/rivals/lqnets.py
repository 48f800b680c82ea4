"""LQ-Nets (Zhang et al., ECCV 2018): a learned quantizer basis, fitted in the forward pass.

A b-bit LQ-Nets quantizer has a basis v in R^b and codes e in {-1, +1}^b (weights) or {0, 1}^b
(activations); its 2^b levels are all the inner products e^T v, and x goes to the nearest one.

The basis is not an optimiser parameter: every training forward fits it to the current tensor by
the paper's Quantization Error Minimisation (QEM, LQ-Nets Algorithm 1), alternating
    1. codes: B = the nearest level's code for every element (v fixed),
    2. basis: v* = (B^T B)^-1 B^T x, the least-squares basis for those codes (B fixed),
`qem_iters` times, then moves the stored basis by a moving average v <- m v + (1 - m) v*.
The least squares runs on per-level counts and sums (B^T B = C^T diag(n) C, B^T x = C^T s for the
2^b codes C), so it costs one scatter over x and a b x b solve, without host synchronisation.

Gradient for x: the STE. `ste: default` follows LQ-Nets' official code: for activations
dy/dx = 1 up to the top level and 0 above it; for weights dy/dx = 1 everywhere. `ste: identity`
passes 1 everywhere for both, `ste: top` clips above the top level for both.

Initial basis: the uniform quantizer's binary decomposition, v_i = s 2^i (activations: levels
0, s, ..., (2^b - 1) s) or v_i = s 2^i / 2 (weights: levels +-s/2, +-3s/2, ..., no zero level), with
s the step the configured initialiser finds on the observed data (maximum over batches).
Per tensor by default, as every quantizer of this framework; `per_channel: true` fits one basis
per output channel of a weight, as LQ-Nets' official code does (its levels() is then empty: there
is no single level set). `init.reduce` combines the per-batch steps (max or mean).

Speed: the forward maps x to its level with nuLSQ's op (one pass: C on CPU, Triton on CUDA) on
x - L_0 with steps L_i - L_(i-1); the QEM fit takes its per-level counts and sums from one C pass
on the CPU (eager, one basis), elsewhere from one pass per threshold up to 4 bits
(`counts_and_sums`) and from a search beyond.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from nulsq.errors import UserError
from nulsq.quant import functional as F
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.init import INITS
from nulsq.quant.kernels import cpu_rivals
from nulsq.quant.rivals.clip_base import FAST_DTYPES, mask_grad

STES = ("default", "identity", "top")


def all_codes(bits: int, signed: bool) -> Tensor:
    """The 2^bits codes as rows: bit i of row r, as {0, 1} (unsigned) or {-1, +1} (signed)."""
    rows = torch.arange(2**bits)[:, None]
    bits01 = ((rows >> torch.arange(bits)[None, :]) & 1).float()
    return 2 * bits01 - 1 if signed else bits01


def nearest(x: Tensor, levels: Tensor) -> Tensor:
    """Index of the nearest of the ascending `levels` (last dim) for every element of x (rows of x
    match the leading dims of levels; ties go to the lower level)."""
    mids = (levels[..., 1:] + levels[..., :-1]) / 2
    return torch.searchsorted(mids.to(x.dtype).contiguous(), x.contiguous())


# Up to this many thresholds (4 bits) the per-level statistics come from one broadcast pass over
# (threshold, element) pairs; beyond, one search and two scatters are cheaper.
_MAX_THRESHOLD_PASSES = 15


def counts_and_sums(x: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Per row, the count and the sum of the elements whose nearest level is each of `levels`.

    x: (rows, elements); levels: (rows, n) ascending. Element x belongs to level j when
    mid_(j-1) < x <= mid_j (ties to the lower level, as `nearest`). With few levels: from
    C(t) = #(x > t) and S(t) = sum of x over x > t at every midpoint t (relu(x - t) is > 0 exactly
    when x > t, and sums to S(t) - t C(t)); no search, no scatter. One row on the CPU in eager
    mode (fp32/bf16): one C pass (kernels/cpu_rivals.c).
    """
    if levels.shape[0] == 1 and cpu_rivals.ready(x, table=levels.shape[1]):
        counts, sums = cpu_rivals.level_stats(x, levels[0])
        return counts.to(levels.dtype)[None], sums.to(levels.dtype)[None]
    if levels.shape[1] - 1 > _MAX_THRESHOLD_PASSES:
        idx = nearest(x, levels)
        counts = torch.zeros_like(levels).scatter_add_(1, idx, torch.ones_like(x))
        return counts, torch.zeros_like(levels).scatter_add_(1, idx, x)
    mids = (levels[:, 1:] + levels[:, :-1]) / 2
    excess = (x[:, None, :] - mids[:, :, None]).relu_()  # (rows, thresholds, elements), one pass
    excess_sums = excess.sum(2)
    above = excess.sign_().sum(2)  # C(t), in x's dtype (count_nonzero would cast to int64)
    above_sums = excess_sums + mids * above  # S(t)
    c = torch.cat([torch.full_like(levels[:, :1], x.shape[1]), above], 1)
    s = torch.cat([x.sum(1, keepdim=True), above_sums], 1)
    zero = torch.zeros_like(levels[:, :1])
    return c - torch.cat([c[:, 1:], zero], 1), s - torch.cat([s[:, 1:], zero], 1)


class _STE(torch.autograd.Function):
    """y = q (the levels, computed outside), dy/dx = 1, or 1 only up to `top` when given."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, top: Tensor | None) -> Tensor:
        ctx.save_for_backward(x if top is not None else None, top)
        return q

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, top = ctx.saved_tensors
        if top is None:
            return dy, None, None
        if top.dim() == 0 and x.dtype == torch.float32 and x.is_cpu and not torch.compiler.is_compiling():
            # one pass against the top as a number (read without a device sync on the CPU)
            bound = float(np.nextafter(np.float32(top.item()), np.float32(np.inf)))
            return torch.ops.aten.hardtanh_backward(dy, x, -float("inf"), bound), None, None
        return mask_grad(dy, x - top.to(x.dtype), -float("inf"), 0.0, (False, True)), None, None


@QUANTIZERS.register("lqnets")
class LQNetsQuantizer(Quantizer):
    """LQ-Nets with a QEM-fitted basis (module docstring); no learnable parameters.

    Args: as Quantizer (init_method: the initialiser of the uniform starting basis; init_reduce:
    max or mean of the per-batch steps), plus
        momentum: m of the basis moving average, in [0, 1) (0.9 here; 0 keeps the latest fit).
        qem_iters: alternations of codes / least squares per training forward (1 here).
        ste: "default" (official code: activations 0 above the top level, weights 1), "identity"
            or "top" (see the module docstring).
        per_channel: one basis per output channel (weights only; the official code's choice).
    """

    kind = "lqnets"

    def __init__(self, *args, momentum: float = 0.9, qem_iters: int = 1, ste: str = "default",
                 per_channel: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise UserError(f"lqnets momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(qem_iters, int) and qem_iters >= 1):
            raise UserError(f"lqnets qem_iters must be a positive integer, got {qem_iters!r}")
        if ste not in STES:
            raise UserError(f"unknown lqnets ste '{ste}'; valid: {', '.join(STES)}")
        if per_channel and self.role != "weight":
            raise UserError("lqnets per_channel applies to weights only; remove it from the act args")
        INITS.get(self.init_method)  # an unknown initialiser fails here, not after the first batch
        self.momentum = float(momentum)
        self.qem_iters = qem_iters
        self.clip_top = self.role == "act" if ste == "default" else ste == "top"
        self.per_channel = bool(per_channel)
        self.register_buffer("codes", all_codes(self.bits, self.signed), persistent=False)
        # (bits,), or (channels, bits) once a per-channel quantizer has seen its weight
        self.register_buffer("basis", self.uniform_basis(torch.tensor(1.0 / 2**self.bits)))
        self.register_buffer("_observed_step", torch.zeros(()), persistent=False)
        self.register_buffer("_observed_sum", torch.zeros(()), persistent=False)
        self._batches_observed = 0

    def uniform_basis(self, step: Tensor) -> Tensor:
        """The basis whose levels are the uniform grid of step `step` (module docstring)."""
        powers = 2.0 ** torch.arange(self.bits, dtype=torch.float32, device=step.device)
        return powers * step.float() * (0.5 if self.signed else 1.0)

    def sorted_levels(self, basis: Tensor) -> tuple[Tensor, Tensor]:
        """(levels ascending, their codes) for a basis (bits,) or per row of a basis (rows, bits)."""
        codes = self.codes.to(basis.dtype)
        values = (codes * basis[..., None, :]).sum(-1)  # not a matmul: autocast leaves it be
        order = torch.argsort(values, dim=-1)
        return torch.gather(values, -1, order), codes[order]

    def _rows(self, x: Tensor) -> Tensor:
        """x as (channels, elements) for a per-channel basis, else as one row."""
        return x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)

    def _basis_rows(self) -> Tensor:
        return self.basis if self.basis.dim() == 2 else self.basis[None]

    def _match_channels(self, x: Tensor) -> None:
        if self.per_channel and self.basis.dim() == 1:
            self.basis = self.basis.expand(x.shape[0], self.bits).clone()

    # -- QEM -------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_basis(self, x: Tensor) -> None:
        """One QEM round on x (qem_iters alternations), then the moving-average update."""
        self._match_channels(x)
        rows = self._rows(x).to(self.basis.dtype)
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):  # the normal equations stay in fp32
                v = self._qem(rows, self._basis_rows().clone())
        else:
            v = self._qem(rows, self._basis_rows().clone())
        self.basis.mul_(self.momentum).add_((1.0 - self.momentum) * v.reshape(self.basis.shape))

    def _qem(self, x: Tensor, v: Tensor) -> Tensor:
        """x: (rows, elements), v: (rows, bits) -> the least-squares basis of each row."""
        eye = torch.eye(self.bits, device=x.device, dtype=x.dtype)
        for _ in range(self.qem_iters):
            levels, codes = self.sorted_levels(v)  # (rows, 2^b), (rows, 2^b, bits)
            counts, sums = counts_and_sums(x, levels)
            gram = codes.transpose(1, 2) @ (codes * counts[..., None])
            # A tiny ridge towards the current basis keeps a basis entry whose bit no element uses
            # (all-zero row of B^T B) where it is, instead of making the system singular.
            ridge = 1e-6 * (counts.sum(1) + 1.0)[:, None, None]
            rhs = (codes.transpose(1, 2) @ sums[..., None])[..., 0] + ridge[..., 0] * v
            v = torch.linalg.solve_ex(gram + ridge * eye, rhs).result
        return v

    # -- forward -----------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        if self.training:
            self.fit_basis(x.detach())
        self._match_channels(x)
        with torch.no_grad():
            levels, _ = self.sorted_levels(self._basis_rows().to(x.dtype))
            q = self._nearest_level(x.detach(), levels)
        top = None
        if self.clip_top:
            top = levels[:, -1]
            top = top.reshape(-1, *([1] * (x.dim() - 1))) if self.per_channel else top.reshape(())
        return _STE.apply(x, q, top)

    def _nearest_level(self, x: Tensor, levels: Tensor) -> Tensor:
        """The nearest of each row's ascending `levels` (rows, 2^b) for every element of x."""
        if not self.per_channel and cpu_rivals.ready(x, table=levels.shape[1]):
            return cpu_rivals.nearest_forward(x, levels[0])  # one C pass
        if not self.per_channel and x.dtype in FAST_DTYPES:
            low = levels[0, :1]
            steps = (levels[0, 1:] - levels[0, :-1]).float().clamp_min(0.0)
            return F.cast(F.nulsq(x - low, steps).add_(low), x.dtype)
        rows = self._rows(x)
        return torch.gather(levels, 1, nearest(rows, levels)).view(x.shape)

    # -- initialisation ----------------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        step = INITS.get(self.init_method)(x.float(), self.qn, self.qp, self.signed)
        step = step.to(self._observed_step.device)
        self._observed_step = torch.maximum(self._observed_step, step)
        self._observed_sum = self._observed_sum + step
        self._batches_observed += 1

    def end_init(self) -> None:
        super().end_init()
        if self._batches_observed:
            step = (self._observed_step if self.init_reduce == "max"
                    else self._observed_sum / self._batches_observed)
            basis = self.uniform_basis(step.clamp_min(1e-8)).to(self.basis.dtype)
            self.basis.copy_(basis.expand_as(self.basis))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        saved = state_dict.get(prefix + "basis")
        if saved is not None and saved.shape != self.basis.shape and self.per_channel:
            self.basis = torch.zeros_like(saved, device=self.basis.device)  # per-channel: (C, bits)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def levels(self) -> Tensor:
        if self.basis.dim() == 2:  # one level set per channel: no single set to show
            return torch.empty(0)
        return self.sorted_levels(self.basis.float())[0]

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, momentum={self.momentum}, qem_iters={self.qem_iters}, "
                f"clip_top={self.clip_top}, per_channel={self.per_channel}")
