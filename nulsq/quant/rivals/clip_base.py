"""What the clip-based rivals share: a learnable clip alpha, weight normalisation, STE modes, and
the projection of x/alpha onto a fixed set of unit levels (APoT, LCQ's ternary weights).

`ClipQuantizer` is the base of PACT, APoT, LCQ and the ternary quantizer: it owns alpha,
initialises it (a paper's constant, or Qp times the step the configured initialiser finds on the
observed data, combined over batches by `init.reduce`), scales alpha's gradient, and applies the
optional weight normalisation that APoT and LCQ use.

`clip_project` is y = alpha * P(clamp(x / alpha, -1 or 0, 1)), P the nearest unit level (ties
toward zero), with APoT's reparameterised clipping function (RCF) as gradients:

    dy/dalpha = P(x/alpha) - x/alpha inside the clip range, the clipped level outside (sign(x);
    for unsigned inputs 1 above alpha and 0 below zero);
    dy/dx = 1 inside (closed range); outside 0 (clipped STE) or 1 (unclipped STE).

It is one autograd Function. In eager mode on the CPU (fp32/bf16) it is one C pass each way
(kernels/cpu_rivals.c), saving x alone; elsewhere elementwise torch code and two dot products
that torch.compile fuses, with no bucketize on fp32/bf16 (the nearest level comes from nuLSQ's
kernels, which classify x against the same grid in one pass), saving x / alpha and y.
"""

from __future__ import annotations

import math
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from nulsq.errors import UserError
from nulsq.quant import functional as F
from nulsq.quant.base import Quantizer
from nulsq.quant.init import INITS
from nulsq.quant.kernels import cpu_rivals
from nulsq.registry import Registry

# A weight normalisation maps w to (w_normalised, output_scale or None); the quantizer clips and
# quantizes w_normalised, then multiplies its output by output_scale.
WeightNorm = Callable[[Tensor], "tuple[Tensor, Tensor | None]"]
WEIGHT_NORMS: Registry[WeightNorm] = Registry("weight normalisation")

_STD_FLOOR = 1e-8  # a constant weight tensor has std 0: do not divide by it

# STE choice for x outside the clip range: True = clipped (gradient 0 there), False = unclipped.
STE_MODES: Registry[bool] = Registry("STE mode")
STE_MODES.register("clipped")(True)
STE_MODES.register("unclipped")(False)

# Fast kernels (nuLSQ's, LSQ's) compute in fp32: wider dtypes (the float64 tests) take plain torch.
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@WEIGHT_NORMS.register("none")
def _no_norm(w: Tensor) -> tuple[Tensor, None]:
    return w, None


@WEIGHT_NORMS.register("standardize")
def _standardize(w: Tensor) -> tuple[Tensor, None]:
    """APoT's code (CIFAR version): (w - mean) / std with the statistics as constants; the output
    stays in normalised units (the BatchNorm after the conv absorbs the scale)."""
    w0 = w.detach()
    return (w - w0.mean()) / w0.std().clamp_min(_STD_FLOOR), None


@WEIGHT_NORMS.register("lwn")
def _limited(w: Tensor) -> tuple[Tensor, Tensor]:
    """LCQ's limited weight normalisation: quantize (w - mean) / std, multiply the output by std.
    Mean and std stay differentiable, as in the nuLSQ authors' LCQ (the comparison tables' code)."""
    std = w.std().clamp_min(_STD_FLOOR)
    return (w - w.mean()) / std, std


def scale_grad(p: Tensor, g: float) -> Tensor:
    """p in the forward pass, g * dL/dp in the backward pass (LSQ's gradient scale)."""
    if g == 1.0:
        return p
    return (p - p * g).detach() + p * g


def mirror(magnitudes: Tensor, signed: bool) -> Tensor:
    """Ascending levels from ascending non-negative magnitudes (magnitudes[0] == 0): the magnitudes
    themselves (unsigned) or -m_n .. -m_1, 0, m_1 .. m_n (signed)."""
    if not signed:
        return magnitudes
    return torch.cat([-magnitudes[1:].flip(0), magnitudes])


# -- interval masks without host syncs ---------------------------------------------------------


_BOUNDS: dict[tuple, tuple[float, float]] = {}


def open_bounds(lo: float, hi: float, dtype: torch.dtype, closed: tuple[bool, bool]
                ) -> tuple[float, float]:
    """Bounds (a, b) with a < u < b exactly when u lies in [lo, hi] (ends closed as asked) for
    every u of `dtype` (fp32 arithmetic unless float64), so that `hardtanh_backward(dy, u, a, b)`
    masks dy in one fused pass. A closed end at 0 moves to minus the smallest normal number (not a
    subnormal, which flush-to-zero would read as 0). Memoised in eager mode (traced when compiling)."""
    key = (lo, hi, dtype, closed)
    compiling = torch.compiler.is_compiling()
    if not compiling and key in _BOUNDS:
        return _BOUNDS[key]
    wide = np.float64 if dtype == torch.float64 else np.float32

    def outward(v: float, direction: float) -> float:
        if v == 0:
            return direction * float(np.finfo(wide).tiny)
        return float(np.nextafter(wide(v), wide(direction * np.inf)))

    bounds = (outward(lo, -1.0) if closed[0] else lo), (outward(hi, 1.0) if closed[1] else hi)
    if not compiling:
        _BOUNDS[key] = bounds
    return bounds


def mask_grad(dy: Tensor, u: Tensor, lo: float, hi: float, closed: tuple[bool, bool]) -> Tensor:
    """dy where u lies in the interval [lo, hi] (ends closed as asked), 0 elsewhere: one pass."""
    a, b = open_bounds(lo, hi, u.dtype, closed)
    return torch.ops.aten.hardtanh_backward(dy, u, a, b)


# -- projection onto unit levels ---------------------------------------------------------------


def project_reference(c: Tensor, magnitudes: Tensor, signed: bool) -> Tensor:
    """Nearest level of sign(c) * magnitudes (ties toward zero); c must lie in [-1, 1] or [0, 1].
    One bucketize: exact in any dtype, slow on CPU (the float64 path)."""
    mags = magnitudes.to(device=c.device, dtype=c.dtype)
    mids = (mags[1:] + mags[:-1]) / 2
    nearest = mags[torch.bucketize(c.abs(), mids)]
    return torch.sign(c) * nearest if signed else nearest


def project(c: Tensor, magnitudes: Tensor, signed: bool) -> Tensor:
    """`project_reference`; for fp32/bf16 through nuLSQ's op (C on CPU, Triton on CUDA, fused
    under compile), whose grid of steps = the magnitudes' differences is the same level set."""
    if c.dtype not in FAST_DTYPES:
        return project_reference(c, magnitudes, signed)
    steps = (magnitudes[1:] - magnitudes[:-1]).to(device=c.device, dtype=torch.float32)
    return F.nulsq(c, steps, steps if signed else None)


class _ClipProject(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, magnitudes: Tensor, signed: bool, clipped: bool
                ) -> Tensor:
        ctx.signed, ctx.clipped = signed, clipped
        ctx.fast = cpu_rivals.ready(x, table=magnitudes.numel())
        if ctx.fast:  # one C pass; the backward recomputes P from x
            ctx.save_for_backward(x, alpha, magnitudes)
            return cpu_rivals.project_forward(x, alpha, magnitudes, signed)
        u = x / alpha
        p = project(u.clamp(-1.0 if signed else 0.0, 1.0), magnitudes, signed)
        y = F.cast(p * alpha, x.dtype)
        ctx.save_for_backward(x, u, alpha, y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        need_alpha = ctx.needs_input_grad[1]
        if ctx.fast:
            x, alpha, magnitudes = ctx.saved_tensors
            dx, dalpha = cpu_rivals.project_backward(dy, x, alpha, magnitudes, ctx.signed,
                                                     ctx.clipped, need_alpha)
            if dalpha is not None:
                dalpha = dalpha.reshape(alpha.shape).to(alpha.dtype)
            return F.cast(dx, dy.dtype), dalpha, None, None, None
        x, u, alpha, y = ctx.saved_tensors
        inside = mask_grad(dy, u, -1.0 if ctx.signed else 0.0, 1.0, (True, True))
        dx = inside if ctx.clipped else dy
        dalpha = None
        if need_alpha:
            # sum dy * (P - u [inside]) = (dy . y - dy[inside] . x) / alpha
            dot = torch.dot(dy.reshape(-1), y.reshape(-1)) - torch.dot(inside.reshape(-1), x.reshape(-1))
            dalpha = (dot / alpha).reshape(alpha.shape).to(alpha.dtype)
        return dx, dalpha, None, None, None


def clip_project(x: Tensor, alpha: Tensor, magnitudes: Tensor, signed: bool,
                 clipped_ste: bool = True) -> Tensor:
    """y = alpha * P(clamp(x / alpha)) with the RCF gradients of the module docstring.

    Args:
        x: input (any shape).
        alpha: the clipping threshold (0-d tensor, differentiable).
        magnitudes: ascending non-negative levels for alpha = 1, magnitudes[0] = 0, the last = 1.
        signed: symmetric levels +-magnitudes (clip to [-1, 1]) or magnitudes only (clip to [0, 1]).
        clipped_ste: dy/dx = 0 outside the clip range (True) or 1 everywhere (False).
    """
    return _ClipProject.apply(x, alpha, magnitudes, signed, clipped_ste)


# -- the base quantizer ------------------------------------------------------------------------


class ClipQuantizer(Quantizer):
    """Base of the quantizers with one learnable clipping threshold alpha (PACT, APoT, LCQ, ternary).

    Subclasses implement `clip_quantize(x, alpha)` (x already weight-normalised) and
    `unit_levels()` (the levels for alpha = 1).

    Args:
        bits, signed, role, init_method: as `Quantizer`.
        grad_scale: "none"; "lsq" scales alpha's gradient by 1/sqrt(N * Qp) (N: elements per
            sample, LSQ's paper); "authors" by sqrt(Qp / N) with N the channel count of an
            activation and the element count of a weight, as the nuLSQ authors' LCQ and APoT do
            (LCQ also scales its companding parameters, see `LCQQuantizer`).
        init_reduce: "max" or "mean" of the per-batch clips over the observed batches.
        clip_init: "default" (the class's `DEFAULT_CLIP_INIT` for this role), "data" (Qp times the
            step that the `init_method` initialiser gives on the (normalised) observed input,
            combined over batches by init_reduce) or a positive number (a fixed initial alpha).
        weight_norm: "default" (`DEFAULT_WEIGHT_NORM` for weights, "none" for activations), or a
            name in WEIGHT_NORMS: "none", "standardize" (APoT), "lwn" (LCQ). Weights only.
    """

    DEFAULT_CLIP_INIT: ClassVar[dict[str, float | str]] = {"weight": "data", "act": "data"}
    DEFAULT_WEIGHT_NORM: ClassVar[str] = "none"

    def __init__(
        self, *args, clip_init: float | str = "default", weight_norm: str = "default", **kwargs
    ) -> None:
        super().__init__(*args, **kwargs)
        self.clip_init = self._resolve_clip_init(clip_init)
        self.weight_norm = self._resolve_weight_norm(weight_norm)
        self._normalise = WEIGHT_NORMS.get(self.weight_norm)
        self.alpha = nn.Parameter(torch.tensor(self.clip_init or 1.0))
        self.register_buffer("_observed_clip", torch.zeros(()), persistent=False)
        self.register_buffer("_observed_sum", torch.zeros(()), persistent=False)
        # The output scale of the last forward (weight std under "lwn"), so levels() is in real units.
        self.register_buffer("_out_scale", torch.ones(()), persistent=False)
        self._batches_observed = 0

    def _resolve_clip_init(self, clip_init: float | str) -> float | None:
        """A fixed initial alpha, or None for an alpha measured on the observed data."""
        if clip_init == "default":
            clip_init = self.DEFAULT_CLIP_INIT[self.role]
        if clip_init == "data":
            INITS.get(self.init_method)  # an unknown initialiser fails here, not at init time
            return None
        try:
            value = float(clip_init)
        except (TypeError, ValueError):
            value = float("nan")
        if not value > 0:
            raise UserError(
                f"quantizer '{self.kind}' clip_init must be 'default', 'data' or a positive number, "
                f"got {clip_init!r}"
            )
        return value

    def _resolve_weight_norm(self, weight_norm: str) -> str:
        if weight_norm == "default":
            return self.DEFAULT_WEIGHT_NORM if self.role == "weight" else "none"
        WEIGHT_NORMS.get(weight_norm)
        if self.role != "weight" and weight_norm != "none":
            raise UserError(
                f"quantizer '{self.kind}': weight_norm '{weight_norm}' applies to weights only; "
                "remove it from the activation args"
            )
        return weight_norm

    def grad_scale(self, x: Tensor) -> float:
        """`Quantizer.grad_scale`, plus the authors' sqrt(Qp / N) (N: channels of an activation,
        elements of a weight; the nuLSQ authors' LCQ and APoT code)."""
        if self.grad_scale_mode != "authors":
            return super().grad_scale(x)
        n = x.numel() if self.role == "weight" or x.dim() < 2 else x.shape[1]
        return math.sqrt(max(self.qp, 1) / n)

    # -- forward -----------------------------------------------------------------------------
    def quantize(self, x: Tensor) -> Tensor:
        xn, out_scale = self._normalise(x)
        y = self.clip_quantize(xn, scale_grad(self.alpha, self.grad_scale(x)))
        if out_scale is None:
            return y
        with torch.no_grad():
            self._out_scale.copy_(out_scale)
        return y * out_scale

    def clip_quantize(self, x: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    # -- initialisation ----------------------------------------------------------------------
    def observe(self, x: Tensor) -> None:
        if self.clip_init is not None:
            return
        xn, _ = self._normalise(x)
        step = INITS.get(self.init_method)(xn.float(), self.qn, self.qp, self.signed)
        clip = step.to(self._observed_clip.device) * self.qp
        self._observed_clip = torch.maximum(self._observed_clip, clip)
        self._observed_sum = self._observed_sum + clip
        self._batches_observed += 1

    def end_init(self) -> None:
        super().end_init()
        if self.clip_init is None and self._batches_observed:
            clip = (self._observed_clip if self.init_reduce == "max"
                    else self._observed_sum / self._batches_observed)
            with torch.no_grad():
                self.alpha.copy_(clip.clamp_min(1e-8))

    # -- inspection --------------------------------------------------------------------------
    def unit_levels(self) -> Tensor:
        raise NotImplementedError

    def levels(self) -> Tensor:
        scale = self.alpha.detach().float() * self._out_scale.float()
        return self.unit_levels().float().to(scale.device) * scale

    def step_sizes(self) -> Tensor:
        return self.alpha.detach().reshape(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_norm={self.weight_norm}"
