"""PACT (Choi et al., 2018): a learnable clip alpha on activations, uniform levels on [0, alpha].

PACT clips activations at a learnable alpha and quantizes [0, alpha] uniformly (PACT Eqs. 1-2):

    y = clamp(x, 0, alpha),    y_q = round(y * L / alpha) * alpha / L,    L = 2^b - 1.

Gradients (PACT Eq. 3): the STE treats the rounding as the identity *including its dependence on
alpha*, so y_q is differentiated as y:

    dy_q/dx = 1 on [0, alpha), 0 elsewhere;    dy_q/dalpha = 1 for x >= alpha, 0 for x < alpha.

So, unlike LSQ or APoT's RCF, there is no in-range term round(u) - u in PACT's alpha gradient.
Signed inputs (first layer, Swin/ConvNeXt) use the symmetric variant clamp(x, -alpha, alpha) with
L = 2^(b-1) - 1 steps per side, dy_q/dx = 1 on (-alpha, alpha) and dy_q/dalpha = -1 for
x <= -alpha.

The op is one autograd Function: the forward is LSQ's with step alpha / L (the same numbers:
clamp, divide by the step, round half to even, multiply; C on CPU, Triton on CUDA, fused under
compile), the backward one C pass on the CPU in eager mode (kernels/cpu_rivals.c), elsewhere
two masked passes of elementwise code and a sum.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nulsq.quant import functional as F
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.kernels import cpu_rivals
from nulsq.quant.rivals.clip_base import FAST_DTYPES, ClipQuantizer, mask_grad, mirror


class _PACT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, steps: int, signed: bool) -> Tensor:
        step = alpha.detach() / steps
        if x.dtype in FAST_DTYPES:
            y = F.lsq(x, step.float(), steps if signed else 0, steps)
        else:  # float64: the same arithmetic in x's dtype
            y = torch.round(torch.clamp(x / step, -steps if signed else 0, steps)) * step
        ctx.save_for_backward(x, alpha)
        ctx.signed = signed
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, alpha = ctx.saved_tensors
        if cpu_rivals.ready(x):  # one C pass for dx and alpha's sum
            dx, dalpha = cpu_rivals.pact_backward(dy, x, alpha, ctx.signed, ctx.needs_input_grad[1])
            if dalpha is not None:
                dalpha = dalpha.reshape(alpha.shape).to(alpha.dtype)
            return F.cast(dx, dy.dtype), dalpha, None, None
        u = x / alpha
        dx = mask_grad(dy, u, -1.0 if ctx.signed else 0.0, 1.0, (not ctx.signed, False))
        dalpha = None
        if ctx.needs_input_grad[1]:
            dalpha = mask_grad(dy, u, 1.0, float("inf"), (True, False)).sum()
            if ctx.signed:
                dalpha = dalpha - mask_grad(dy, u, -float("inf"), -1.0, (False, True)).sum()
            dalpha = dalpha.reshape(alpha.shape).to(alpha.dtype)
        return dx, dalpha, None, None


def pact(x: Tensor, alpha: Tensor, steps: int, signed: bool) -> Tensor:
    """PACT Eqs. 1-3: clip to [0, alpha] ([-alpha, alpha] if signed), round to `steps` uniform
    steps per side; the gradients are those of the clip alone (see the module docstring)."""
    return _PACT.apply(x, alpha, int(steps), bool(signed))


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
