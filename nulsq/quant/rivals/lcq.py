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

Gradients: the STE replaces only the rounding (dq_L/du = 1); everything else is differentiated as
written, which gives
    dy/dx = gamma_k(v) / gamma_j(q) inside the clip range, 0 outside (clipped STE);
    dy/dalpha = g^-1(q) - v gamma_k / gamma_j inside, sign(x) outside;
    dy/dtheta~ through g and g^-1 (outside the clip range it is 0, as g(1) = 1 for every theta).

Weights pass through LCQ's limited weight normalisation first (`weight_norm: lwn`): the quantizer
sees (w - mean) / std and its output is multiplied by std. The clips start at 3.0 (weights, in
units of std) and 8.0 (activations), supplement Appendix C-III.

2-bit weights: LCQ's comparison uses a plain symmetric ternary quantizer {-s, 0, s} with a
learnable s (supplement C-III): kind "ternary", or kind "lcq" with `ternary_at_2bit` set, so one
config serves every bit width. Its STE is "clipped" ("LCQ type": dy/dx = 0 for |x| > s) or
"unclipped" ("APoT type": dy/dx = 1 everywhere); ds follows APoT's RCF (`clip_project`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.rivals.apot import STE_MODES, clip_project
from nulsq.quant.rivals.pact import ClipQuantizer, mirror

TERNARY_MAGNITUDES = torch.tensor([0.0, 1.0])


def compander_knots(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slopes gamma_k, offsets beta_k) of the compressor for companding parameters theta~."""
    widths = torch.softmax(theta, dim=0)
    return widths * theta.numel(), torch.cumsum(widths, 0) - widths


def expand(u: torch.Tensor, slopes: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """g^-1(u) for u in [0, 1]: the interval j is chosen by u's value, not differentiated."""
    j = torch.bucketize(u.detach(), offsets[1:].detach().to(u.dtype), right=True)
    return (u - offsets[j]) / slopes[j] + j.to(u.dtype) / slopes.numel()


def compand_quantize(
    x: torch.Tensor, alpha: torch.Tensor, theta: torch.Tensor, steps: int, signed: bool
) -> torch.Tensor:
    """LCQ's quantizer y = sign(x) alpha g^-1(q_L(g(min(|x|/alpha, 1)))) (module docstring).

    Args:
        x: input (any shape).
        alpha: clipping threshold (0-d tensor).
        theta: the K companding parameters theta~ (softmax -> output interval lengths).
        steps: L, uniform steps of the companded domain [0, 1].
        signed: quantize |x| and restore the sign (True), or clip x to [0, alpha] (False).
    """
    slopes, offsets = compander_knots(theta)
    k_count = theta.numel()
    v = ((x.abs() if signed else x) / alpha).clamp(0.0, 1.0)
    k = (v.detach() * k_count).floor().clamp(0, k_count - 1).long()
    u = slopes[k] * (v - k.to(v.dtype) / k_count) + offsets[k]
    u = u + (torch.round(u.detach() * steps) / steps - u.detach())  # STE on the rounding only
    y = alpha * expand(u, slopes, offsets)
    return torch.sign(x) * y if signed else y


@QUANTIZERS.register("lcq")
class LCQQuantizer(ClipQuantizer):
    """LCQ: learnable clip alpha and K learnable companding parameters (module docstring).

    Args: as ClipQuantizer (clip_init default 3.0 for weights, 8.0 for activations; weight_norm
    default "lwn"), plus
        K: number of equal input intervals of the piecewise-linear compressor (16 in the paper).
        ternary_at_2bit: None, or "clipped" / "unclipped": at 2 bits, a weight quantizer becomes
            the ternary {-alpha, 0, alpha} with that STE (no companding parameters then).
    """

    kind = "lcq"
    DEFAULT_CLIP_INIT: ClassVar[dict[str, float | str]] = {"weight": 3.0, "act": 8.0}
    DEFAULT_WEIGHT_NORM: ClassVar[str] = "lwn"

    def __init__(self, *args, K: int = 16, ternary_at_2bit: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not (isinstance(K, int) and K >= 1):
            raise UserError(f"quantizer 'lcq' needs a positive integer K, got {K!r}")
        # A config names the ternary STE once for every bit width; it applies to 2-bit weights only.
        clipped = None if ternary_at_2bit is None else STE_MODES.get(ternary_at_2bit)
        self.ternary_ste = clipped if self.bits == 2 and self.role == "weight" else None
        if self.ternary_ste is None:
            self.theta = nn.Parameter(torch.zeros(K))
        else:
            # No companding parameters at all: an unused parameter would upset DDP and optimizers.
            self.register_parameter("theta", None)
            self.register_buffer("magnitudes", TERNARY_MAGNITUDES.clone(), persistent=False)

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        if self.theta is None:
            return clip_project(x, alpha, self.magnitudes, True, self.ternary_ste)
        return compand_quantize(x, alpha, self.theta, self.qp, self.signed)

    def unit_levels(self) -> torch.Tensor:
        if self.theta is None:
            return mirror(self.magnitudes, True)
        slopes, offsets = compander_knots(self.theta.detach().float())
        grid = torch.arange(self.qp + 1, dtype=torch.float32, device=slopes.device) / self.qp
        return mirror(expand(grid, slopes, offsets), self.signed)

    def extra_repr(self) -> str:
        shape = "ternary" if self.theta is None else f"K={self.theta.numel()}"
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
