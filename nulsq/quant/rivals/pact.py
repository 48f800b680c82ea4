"""PACT (Choi et al., 2018), and the learnable clipping threshold every clip-based rival shares.

PACT clips activations at a learnable alpha and quantizes [0, alpha] uniformly (PACT Eqs. 1-2):

    y = clamp(x, 0, alpha),    y_q = round(y * L / alpha) * alpha / L,    L = 2^b - 1.

Gradients (PACT Eq. 3): the STE treats the rounding as the identity *including its dependence on
alpha*, so y_q is differentiated as y:

    dy_q/dx = 1 on [0, alpha), 0 elsewhere;    dy_q/dalpha = 1 for x >= alpha, 0 for x < alpha.

So, unlike LSQ or APoT's RCF, there is no in-range term round(u) - u in PACT's alpha gradient.
Signed inputs (first layer, Swin/ConvNeXt) use the symmetric variant clamp(x, -alpha, alpha) with
L = 2^(b-1) - 1 steps per side, and dy_q/dalpha = -1 for x <= -alpha.

`ClipQuantizer` is the base of PACT, APoT, LCQ and the ternary quantizer: it owns alpha, initialises
it (a paper's constant, or Qp times the step the configured initialiser finds on the observed data,
the maximum over batches), and applies the optional weight normalisation that APoT and LCQ use.
"""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.init import INITS
from nulsq.registry import Registry

# A weight normalisation maps w to (w_normalised, output_scale or None); the quantizer clips and
# quantizes w_normalised, then multiplies its output by output_scale.
WeightNorm = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor | None]"]
WEIGHT_NORMS: Registry[WeightNorm] = Registry("weight normalisation")

_STD_FLOOR = 1e-8  # a constant weight tensor has std 0: do not divide by it


@WEIGHT_NORMS.register("none")
def _no_norm(w: torch.Tensor) -> tuple[torch.Tensor, None]:
    return w, None


@WEIGHT_NORMS.register("standardize")
def _standardize(w: torch.Tensor) -> tuple[torch.Tensor, None]:
    """APoT's code (CIFAR version): (w - mean) / std with the statistics as constants; the output
    stays in normalised units (the BatchNorm after the conv absorbs the scale)."""
    w0 = w.detach()
    return (w - w0.mean()) / w0.std().clamp_min(_STD_FLOOR), None


@WEIGHT_NORMS.register("lwn")
def _limited(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LCQ's limited weight normalisation: quantize (w - mean) / std, multiply the output by std.
    Mean and std stay differentiable, as in the nuLSQ authors' LCQ (the comparison tables' code)."""
    std = w.std().clamp_min(_STD_FLOOR)
    return (w - w.mean()) / std, std


def scale_grad(p: torch.Tensor, g: float) -> torch.Tensor:
    """p in the forward pass, g * dL/dp in the backward pass (LSQ's gradient scale)."""
    if g == 1.0:
        return p
    return (p - p * g).detach() + p * g


def mirror(magnitudes: torch.Tensor, signed: bool) -> torch.Tensor:
    """Ascending levels from ascending non-negative magnitudes (magnitudes[0] == 0): the magnitudes
    themselves (unsigned) or -m_n .. -m_1, 0, m_1 .. m_n (signed)."""
    if not signed:
        return magnitudes
    return torch.cat([-magnitudes[1:].flip(0), magnitudes])


class ClipQuantizer(Quantizer):
    """Base of the quantizers with one learnable clipping threshold alpha (PACT, APoT, LCQ, ternary).

    Subclasses implement `clip_quantize(x, alpha)` (x already weight-normalised) and
    `unit_levels()` (the levels for alpha = 1).

    Args:
        bits, signed, role, grad_scale, init_method: as `Quantizer`; grad_scale "lsq" scales alpha's
            gradient by 1/sqrt(N * Qp).
        clip_init: "default" (the class's `DEFAULT_CLIP_INIT` for this role), "data" (Qp times the
            step that the `init_method` initialiser gives on the (normalised) observed input, the
            maximum over the observed batches) or a positive number (a fixed initial alpha).
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

    # -- forward -----------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        xn, out_scale = self._normalise(x)
        y = self.clip_quantize(xn, scale_grad(self.alpha, self.grad_scale(x)))
        if out_scale is None:
            return y
        with torch.no_grad():
            self._out_scale.copy_(out_scale)
        return y * out_scale

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # -- initialisation ----------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        if self.clip_init is not None:
            return
        xn, _ = self._normalise(x)
        step = INITS.get(self.init_method)(xn.float(), self.qn, self.qp, self.signed)
        clip = step.to(self._observed_clip.device) * self.qp
        self._observed_clip = torch.maximum(self._observed_clip, clip)
        self._batches_observed += 1

    def end_init(self) -> None:
        super().end_init()
        if self.clip_init is None and self._batches_observed:
            with torch.no_grad():
                self.alpha.copy_(self._observed_clip.clamp_min(1e-8))

    # -- inspection --------------------------------------------------------------------------
    def unit_levels(self) -> torch.Tensor:
        raise NotImplementedError

    def levels(self) -> torch.Tensor:
        scale = self.alpha.detach().float() * self._out_scale.float()
        return self.unit_levels().float().to(scale.device) * scale

    def step_sizes(self) -> torch.Tensor:
        return self.alpha.detach().reshape(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight_norm={self.weight_norm}"


def pact(x: torch.Tensor, alpha: torch.Tensor, steps: int, signed: bool) -> torch.Tensor:
    """PACT Eqs. 1-3: clip to [0, alpha] ([-alpha, alpha] if signed), round to `steps` uniform
    steps per side; the gradients are those of the clip alone (see the module docstring)."""
    low = -alpha if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, low), alpha)
    step = alpha.detach() / steps
    return y + (torch.round(y.detach() / step) * step - y.detach())


@QUANTIZERS.register("pact")
class PACTQuantizer(ClipQuantizer):
    """PACT on activations (Choi et al.): learnable clip alpha, uniform levels on [0, alpha].

    Args: as ClipQuantizer; clip_init defaults to "data" (the supplement's main Table 5 initialises
    every quantizer parameter by the MSE method; PACT's own paper starts alpha at 10).
    """

    kind = "pact"

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return pact(x, alpha, self.qp, self.signed)

    def unit_levels(self) -> torch.Tensor:
        return mirror(torch.arange(self.qp + 1, dtype=torch.float32) / self.qp, self.signed)
