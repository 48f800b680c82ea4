"""LCQ (Yamamoto, CVPR 2021): learnable companding quantization, and its 2-bit ternary weights.

LCQ quantizes |x| on a learnable clip alpha through a compander (compress, round, expand):

    v = min(|x| / alpha, 1),    y = sign(x) * alpha * g^-1(q_L(g(v))),    q_L(u) = round(u L) / L,

with L = 2^b - 1 for unsigned inputs and 2^(b-1) - 1 per side for signed ones. The compressor g is
piecewise linear on K equal input intervals [k/K, (k+1)/K) of [0, 1]. Its output interval lengths
are theta_k = softmax(theta~)_k (the K learnable companding parameters), so g maps [0, 1] onto
[0, 1] with slopes gamma_k = K theta_k and offsets beta_k = theta_0 + ... + theta_(k-1):

    g(v) = gamma_k (v - k/K) + beta_k         for v in interval k,
    g^-1(u) = (u - beta_j) / gamma_j + j/K    for u in [beta_j, beta_(j+1)).

theta~ = 0 gives g = identity: LCQ starts as a uniform quantizer with step alpha / L.

Gradients, `grad: authors` (the default; the nuLSQ authors' LCQ, whose code made the comparison
tables): the STE passes x's gradient straight through the whole compander,
    dy/dx = 1 for |x| < alpha, 0 outside;
    dy/dalpha = (y - x) / alpha inside (sign(x) g^-1(q) - x / alpha), sign(x) outside;
`grad: compander`: the STE replaces only the rounding (dq_L/du = 1) and everything else is
differentiated as written,
    dy/dx = gamma_k(v) / gamma_j(q) inside the clip range (closed), 0 outside;
    dy/dalpha = g^-1(q) - v gamma_k / gamma_j inside, sign(x) outside.
The two agree at theta~ = 0. In both, dy/dtheta~ goes through g and g^-1 with the STE on the
rounding (the authors' code computes exactly these gamma and beta gradients; outside the clip
range it is 0, as g(1) = 1 for every theta). With `grad_scale: authors` the gradients of alpha and
of theta~ are both scaled by sqrt(Qp / N), as the authors scale alpha, gamma and beta.

Speed: K = 16 intervals, so the compander is a 16-entry table. The forward takes the interval from
v K (no search), L g(v) = a_k v K + b_k from one 16-entry table, and the output from the
(L + 1)-entry table alpha g^-1(j / L). The backward needs, besides dx and two dot products for
alpha, the sums of dy sign(x) and of dy sign(x) v per cell (interval k, level q), K (L + 1) of
them, from which table arithmetic gives the gradients of gamma and beta (`_knot_gradients`).
In eager mode on the CPU (fp32/bf16) both directions are one C pass each (kernels/cpu_rivals.c:
table lookups by register permutes, the cells' sums per thread in float64) and only x is kept
for the backward, which finds each element's cell again. Elsewhere (CUDA, torch.compile,
float64) it is torch code: it keeps x / alpha, y and one int32 index (interval, level, scatter
lane) per element, no int64 tensor, and sums the cells with two index_add scatters. No host
syncs, no Python loop over elements, either way.

Weights pass through LCQ's limited weight normalisation first (`weight_norm: lwn`): the quantizer
sees (w - mean) / std and its output is multiplied by std. The clips start at 3.0 (weights, in
units of std) and 8.0 (activations), supplement Appendix C-III.

2-bit weights: LCQ's comparison uses a plain symmetric ternary quantizer {-s, 0, s} with a
learnable s (supplement C-III): kind "ternary", or kind "lcq" with `ternary_at_2bit` set, so one
config serves every bit width. Its STE is "clipped" ("LCQ type": dy/dx = 0 for |x| > s) or
"unclipped" ("APoT type": dy/dx = 1 everywhere); ds follows APoT's RCF (`clip_project`), which is
also what the authors' ternary op computes.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from nulsq.errors import UserError
from nulsq.quant import functional as F
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.kernels import cpu_rivals
from nulsq.quant.rivals.clip_base import (
    STE_MODES,
    ClipQuantizer,
    clip_project,
    mask_grad,
    mirror,
    scale_grad,
)

TERNARY_MAGNITUDES = torch.tensor([0.0, 1.0])
GRAD_MODES = ("authors", "compander")


def compander_knots(theta: Tensor) -> tuple[Tensor, Tensor]:
    """(slopes gamma_k, offsets beta_k) of the compressor for companding parameters theta~."""
    widths = torch.softmax(theta, dim=0)
    return widths * theta.numel(), torch.cumsum(widths, 0) - widths


def expand(u: Tensor, slopes: Tensor, offsets: Tensor) -> Tensor:
    """g^-1(u) for u in [0, 1]: the interval j is chosen by u's value, not differentiated."""
    j = torch.bucketize(u.detach(), offsets[1:].detach().to(u.dtype), right=True)
    return (u - offsets[j]) / slopes[j] + j.to(u.dtype) / slopes.numel()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _gather(table: Tensor, index: Tensor) -> Tensor:
    """table[index] for a contiguous int32 index of any shape (index_select: no int64 copy)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


class _OutputTable:
    """The compander's (L + 1) output levels and what the backward needs of them, from the knots."""

    def __init__(self, slopes: Tensor, offsets: Tensor, steps: int) -> None:
        k_count = slopes.numel()
        self.grid = torch.arange(steps + 1, dtype=slopes.dtype, device=slopes.device) / steps
        self.j = torch.bucketize(self.grid, offsets[1:], right=True)  # output interval of j / L
        self.gamma_j, self.beta_j = slopes[self.j], offsets[self.j]
        self.unit_levels = (self.grid - self.beta_j) / self.gamma_j + self.j.to(slopes.dtype) / k_count


class _Compand(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, slopes: Tensor, offsets: Tensor, steps: int,
                signed: bool, authors: bool) -> Tensor:
        cd = _compute_dtype(x)
        a, sl, off = alpha.detach().to(cd), slopes.detach().to(cd), offsets.detach().to(cd)
        k_count = sl.numel()
        # L g(v) = b_k + a_k (v K) on input interval k: the coefficient tables
        knots = torch.arange(k_count, dtype=cd, device=x.device)
        intercepts, slopes_vk = (off - sl * knots / k_count) * steps, sl * (steps / k_count)
        out = _OutputTable(sl, off, steps)
        ctx.steps, ctx.signed, ctx.authors = steps, signed, authors
        ctx.fast = cpu_rivals.ready(x)
        if ctx.fast:  # one C pass; the backward recomputes each element's cell from x
            ctx.tables = cpu_rivals.CompanderTables(intercepts, slopes_vk, out.unit_levels * a,
                                                    _BELOW_ONE[torch.float32])
            ctx.out = out
            ctx.save_for_backward(x, alpha, slopes, offsets)
            return cpu_rivals.lcq_forward(x, alpha, ctx.tables, signed)
        xf = x.detach().to(cd).contiguous()
        t = (xf.abs() if signed else xf) / a
        # v K with v clamped to [0, 1): its integer part is the interval k, never K (at v = 1
        # the top interval gives L g(v) = L as well)
        vk = t.clamp(0.0, _BELOW_ONE[cd]).mul_(k_count)
        k = vk.to(torch.int32)  # floor: vk >= 0
        # L g(v) rounded: the level q; cell = (k, q) in one int
        if torch.compiler.is_compiling():  # inductor fuses the gathers (it has no complex codegen)
            level = torch.addcmul(_gather(intercepts, k), _gather(slopes_vk, k), vk)
        else:  # eager: both coefficients from one gather of a complex table (b_k + i a_k)
            coefficients = torch.view_as_real(_gather(torch.complex(intercepts, slopes_vk), k))
            level = torch.addcmul(coefficients[..., 0], coefficients[..., 1], vk)
        cell = torch.add(level.round_(), k, alpha=steps + 1).to(torch.int32)
        # eager: the backward reuses these small tables (a traced graph recomputes them)
        ctx.out = None if torch.compiler.is_compiling() else out
        y = _gather((out.unit_levels * a).repeat(k_count), cell)  # the level of q, whatever k
        # cell * LANES + (element index mod LANES): neighbouring elements of one cell (a ReLU's
        # zeros) then add into different bins, so the backward's scatter sums do not serialise
        lanes = ctx.lanes = lane_count(x.device, k_count * (steps + 1))
        cell = cell.mul_(lanes).add_(_lanes(cell.numel(), lanes, cell.device).view(cell.shape))
        if signed:
            y = torch.copysign(y, xf)
        ctx.save_for_backward(xf, t, y, cell, alpha, slopes, offsets)
        return F.cast(y, x.dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        if ctx.fast:
            return _Compand.backward_fast(ctx, dy)
        xf, t, y, cell, alpha, slopes, offsets = ctx.saved_tensors
        steps, signed, authors = ctx.steps, ctx.signed, ctx.authors
        need_alpha, need_knots = ctx.needs_input_grad[1], any(ctx.needs_input_grad[2:4])
        cd = xf.dtype
        a, sl = alpha.detach().to(cd), slopes.detach().to(cd)
        out = ctx.out or _OutputTable(sl, offsets.detach().to(cd), steps)
        d = dy.to(cd).contiguous()
        inside = mask_grad(d, t, 0.0, 1.0, (True, not authors))  # dy where |x| < alpha (<=)
        if authors:
            dx = inside
        else:  # gamma_k(v) / gamma_j(q)
            ratio = _ratio(sl, out).reshape(-1).repeat_interleave(ctx.lanes)
            dx = inside * _gather(ratio, cell)
        sums = None
        if need_knots or (need_alpha and authors):
            sums = _cell_sums(inside, t, xf if signed else None, cell, sl.numel() * (steps + 1),
                              ctx.lanes)
        dalpha = dslopes = doffsets = None
        if need_alpha:
            # dy/dalpha = y/alpha - x/alpha [inside]; with dx = dy [inside] (authors), the sum of
            # dx x / alpha is the sum of dy sign(x) t over the inside: the cells' sums already
            dy_y = torch.dot(d.reshape(-1), y.reshape(-1)) / a
            dx_x = sums[1].sum() if authors else torch.dot(dx.reshape(-1), xf.reshape(-1)) / a
            dalpha = (dy_y - dx_x).reshape(alpha.shape).to(alpha.dtype)
        if need_knots:
            dslopes, doffsets = _knot_gradients(*sums, a, sl, out, steps)
            dslopes, doffsets = dslopes.to(slopes.dtype), doffsets.to(offsets.dtype)
        return F.cast(dx, dy.dtype), dalpha, dslopes, doffsets, None, None, None

    @staticmethod
    def backward_fast(ctx, dy: Tensor):
        """The C kernel's backward: dx, the two dot products for alpha and the cells' sums."""
        x, alpha, slopes, offsets = ctx.saved_tensors
        need_alpha, need_knots = ctx.needs_input_grad[1], any(ctx.needs_input_grad[2:4])
        out, sl = ctx.out, slopes.detach().float()
        ratio = None if ctx.authors else _ratio(sl, out)
        dx, dots, cells = cpu_rivals.lcq_backward(dy, x, alpha, ctx.tables, ctx.signed, ratio,
                                                  need_knots)
        a = alpha.detach().float()
        dalpha = dslopes = doffsets = None
        if need_alpha:  # (sum dy y - sum dx x) / alpha
            dalpha = ((dots[0] - dots[1]).float() / a).reshape(alpha.shape).to(alpha.dtype)
        if need_knots:
            dslopes, doffsets = _knot_gradients(*cells.float(), a, sl, out, ctx.steps)
            dslopes, doffsets = dslopes.to(slopes.dtype), doffsets.to(offsets.dtype)
        return F.cast(dx, dy.dtype), dalpha, dslopes, doffsets, None, None, None


def _ratio(sl: Tensor, out: _OutputTable) -> Tensor:
    """(K, L + 1): dx's factor gamma_k(v) / gamma_j(q) per (input interval, level), `grad: compander`."""
    return sl[:, None] / out.gamma_j[None, :]


# Scatter lanes per cell (see the forward), and the lane of each element for the sizes seen.
_CPU_LANES = 8
_MAX_LANE_BINS = 2**20  # cells x lanes, at most (8-bit: 4096 cells, 256 lanes)
_LANE_CACHE: dict[tuple[int, int, torch.device], Tensor] = {}


def lane_count(device: torch.device, cells: int) -> int:
    """Copies of the K (L + 1) cells that the scatter sums spread over (a power of two): 8 on
    the CPU; on a GPU as many as functional's bins get (1024), within _MAX_LANE_BINS, since
    thousands of threads adding a ReLU's zeros into one cell serialise on its atomics."""
    if device.type == "cpu":
        return _CPU_LANES
    most = max(_CPU_LANES, _MAX_LANE_BINS // cells)
    return min(F.GPU_BIN_COPIES, 1 << (most.bit_length() - 1))


def _lanes(n: int, lanes: int, device: torch.device) -> Tensor:
    """(element index mod lanes) as int32 for n elements; cached per size in eager mode."""
    key = (n, lanes, device)
    compiling = torch.compiler.is_compiling()
    if not compiling and key in _LANE_CACHE:
        return _LANE_CACHE[key]
    lane = torch.arange(n, dtype=torch.int32, device=device).bitwise_and_(lanes - 1)
    if not compiling:
        if len(_LANE_CACHE) >= 64:  # a model has a few activation sizes; bound it anyway
            _LANE_CACHE.clear()
        _LANE_CACHE[key] = lane
    return lane


# the largest value below 1 per compute dtype (v K then stays below K)
_BELOW_ONE = {torch.float32: 1.0 - 2.0**-24, torch.float64: 1.0 - 2.0**-53}


def _cell_sums(inside: Tensor, t: Tensor, x_signed: Tensor | None, cell: Tensor, bins: int,
               lanes: int) -> tuple[Tensor, Tensor]:
    """Per (interval, level) cell: the sums of w = dy sign(x) [inside] and of w t (= w v there).
    `cell` holds cell * lanes + lane: the lanes' partial sums are added up at the end."""
    w = inside if x_signed is None else inside * torch.sign(x_signed)
    index = cell.reshape(-1)  # int32: index_add_ takes it as is (scatter_add_ would need int64)
    sum_w = w.new_zeros(bins * lanes).index_add_(0, index, w.reshape(-1))
    sum_wv = w.new_zeros(bins * lanes).index_add_(0, index, (w * t).reshape(-1))
    return sum_w.view(bins, lanes).sum(1), sum_wv.view(bins, lanes).sum(1)


def _knot_gradients(sum_w: Tensor, sum_wv: Tensor, a: Tensor, sl: Tensor, out: _OutputTable,
                    steps: int) -> tuple[Tensor, Tensor]:
    """dL/dgamma, dL/dbeta from the cells' sums of w = dy sign(x) [inside] and w v.

    Per element, with k its input interval, j its output interval, q = level / L:
        dy/dgamma_k = sign a (v - k/K) / gamma_j,   dy/dbeta_k = sign a / gamma_j   (through g)
        dy/dgamma_j = -sign a (q - beta_j) / gamma_j^2,   dy/dbeta_j = -sign a / gamma_j   (g^-1)
    """
    k_count, levels = sl.numel(), steps + 1
    sum_w, sum_wv = sum_w.view(k_count, levels), sum_wv.view(k_count, levels)
    knots = torch.arange(k_count, dtype=sl.dtype, device=sl.device) / k_count
    r = 1.0 / out.gamma_j
    through_g_gamma = (sum_wv - knots[:, None] * sum_w) @ r
    through_g_beta = sum_w @ r
    per_level = sum_w.sum(0)
    inverse_gamma = sl.new_zeros(k_count).index_add_(
        0, out.j, per_level * (out.grid - out.beta_j) * r * r)
    inverse_beta = sl.new_zeros(k_count).index_add_(0, out.j, per_level * r)
    return a * (through_g_gamma - inverse_gamma), a * (through_g_beta - inverse_beta)


def compand_quantize(x: Tensor, alpha: Tensor, theta: Tensor, steps: int, signed: bool,
                     grad: str = "authors") -> Tensor:
    """LCQ's quantizer y = sign(x) alpha g^-1(q_L(g(min(|x|/alpha, 1)))) (module docstring).

    Args:
        x: input (any shape).
        alpha: clipping threshold (0-d tensor).
        theta: the K companding parameters theta~ (softmax -> output interval lengths).
        steps: L, uniform steps of the companded domain [0, 1].
        signed: quantize |x| and restore the sign (True), or clip x to [0, alpha] (False).
        grad: "authors" (dy/dx = 1 inside, the nuLSQ authors' code) or "compander" (through g).
    """
    slopes, offsets = compander_knots(theta)
    return _Compand.apply(x, alpha, slopes, offsets, int(steps), bool(signed), grad == "authors")


@QUANTIZERS.register("lcq")
class LCQQuantizer(ClipQuantizer):
    """LCQ: learnable clip alpha and K learnable companding parameters (module docstring).

    Args: as ClipQuantizer (clip_init default 3.0 for weights, 8.0 for activations; weight_norm
    default "lwn"), plus
        K: number of equal input intervals of the piecewise-linear compressor (16 in the paper).
        ternary_at_2bit: None, or "clipped" / "unclipped": at 2 bits, a weight quantizer becomes
            the ternary {-alpha, 0, alpha} with that STE (no companding parameters then).
        grad: "authors" (default: dy/dx = 1 inside the clip range, the nuLSQ authors' code) or
            "compander" (differentiated through the compander), see the module docstring.
    """

    kind = "lcq"
    DEFAULT_CLIP_INIT: ClassVar[dict[str, float | str]] = {"weight": 3.0, "act": 8.0}
    DEFAULT_WEIGHT_NORM: ClassVar[str] = "lwn"

    def __init__(self, *args, K: int = 16, ternary_at_2bit: str | None = None,
                 grad: str = "authors", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not (isinstance(K, int) and K >= 1):
            raise UserError(f"quantizer 'lcq' needs a positive integer K, got {K!r}")
        if grad not in GRAD_MODES:
            raise UserError(f"unknown lcq grad '{grad}'; valid: {', '.join(GRAD_MODES)}")
        self.grad = grad
        self._theta_scale = 1.0
        # A config names the ternary STE once for every bit width; it applies to 2-bit weights only.
        clipped = None if ternary_at_2bit is None else STE_MODES.get(ternary_at_2bit)
        self.ternary_ste = clipped if self.bits == 2 and self.role == "weight" else None
        if self.ternary_ste is None:
            self.theta = nn.Parameter(torch.zeros(K))
        else:
            # No companding parameters at all: an unused parameter would upset DDP and optimizers.
            self.register_parameter("theta", None)
            self.register_buffer("magnitudes", TERNARY_MAGNITUDES.clone(), persistent=False)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        # The authors scale the companding parameters' gradient as alpha's (sqrt(Qp / N)).
        self._theta_scale = self.grad_scale(x) if self.grad_scale_mode == "authors" else 1.0
        return super().quantize(x)

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if self.theta is None:
            return clip_project(x, alpha, self.magnitudes, True, self.ternary_ste)
        theta = scale_grad(self.theta, self._theta_scale)
        return compand_quantize(x, alpha, theta, self.qp, self.signed, self.grad)

    def unit_levels(self) -> torch.Tensor:
        if self.theta is None:
            return mirror(self.magnitudes, True)
        slopes, offsets = compander_knots(self.theta.detach().float())
        grid = torch.arange(self.qp + 1, dtype=torch.float32, device=slopes.device) / self.qp
        return mirror(expand(grid, slopes, offsets), self.signed)

    def extra_repr(self) -> str:
        shape = "ternary" if self.theta is None else f"K={self.theta.numel()}, grad={self.grad}"
        return f"{super().extra_repr()}, {shape}"


@QUANTIZERS.register("ternary")
class TernaryQuantizer(ClipQuantizer):
    """Symmetric ternary {-s, 0, s} with a learnable s (LCQ's 2-bit weights, supplement C-III).

    Args: as ClipQuantizer (clip_init default 3.0 for weights, in units of std under the default
    "lwn" weight normalisation), plus
        ste: "clipped" (LCQ type) or "unclipped" (APoT type).
    """

    kind = "ternary"
    supported_bits = (2,)
    DEFAULT_CLIP_INIT: ClassVar[dict[str, float | str]] = {"weight": 3.0, "act": "data"}
    DEFAULT_WEIGHT_NORM: ClassVar[str] = "lwn"

    def __init__(self, *args, ste: str = "clipped", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not self.signed:
            raise UserError("quantizer 'ternary' needs a signed input; use it for weights")
        self.clipped_ste = STE_MODES.get(ste)
        # A buffer, so it lives on the module's device: no host-to-device copy per forward.
        self.register_buffer("magnitudes", TERNARY_MAGNITUDES.clone(), persistent=False)

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return clip_project(x, alpha, self.magnitudes, True, self.clipped_ste)

    def unit_levels(self) -> torch.Tensor:
        return mirror(self.magnitudes, True)
