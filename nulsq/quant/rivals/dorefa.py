"""DoReFa-Net (Zhou et al., 2016): parameter-free quantizers for weights and activations.

quantize_k(r) = round((2^k - 1) r) / (2^k - 1) on r in [0, 1], with the STE d quantize_k / dr = 1.

Weights (DoReFa Eq. 9):
    w_q = 2 quantize_k( tanh(w) / (2 max|tanh(w)|) + 1/2 ) - 1,
2^k levels evenly spaced on [-1, 1] (no zero level). Everything but the rounding is differentiated,
max|tanh(w)| included. Our choice (`scale: max`, the default): w_q is multiplied by max|w| (a
constant in the backward pass), so the quantized weights keep the weights' range; a layer followed
by BatchNorm computes the same function and the same gradients either way, but a layer followed by
no normalisation (Swin, ConvNeXt linears) keeps its pretrained scale. `scale: none` is DoReFa as
printed.

Activations (DoReFa's own): y = quantize_k(clamp(x, 0, 1)), dy/dx = 1 on [0, 1], 0 outside.
Signed activations (first layer, GELU models): the same on clamp(x, -1, 1) mapped to [0, 1], i.e.
2^k levels evenly spaced on [-1, 1]. The activation op is one autograd Function: four in-place
elementwise passes forward, one masked pass backward (torch.compile fuses both).
"""

from __future__ import annotations

import torch

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.rivals.clip_base import mask_grad

SCALES = ("max", "none")


def quantize_unit(r: torch.Tensor, steps: int) -> torch.Tensor:
    """DoReFa's quantize_k on r in [0, 1] with `steps` = 2^k - 1, gradient straight through."""
    return r + (torch.round(r.detach() * steps) / steps - r.detach())


def dorefa_weight(w: torch.Tensor, steps: int) -> torch.Tensor:
    """DoReFa Eq. 9: 2 quantize_k(tanh(w) / (2 max|tanh w|) + 1/2) - 1, values in [-1, 1]."""
    t = torch.tanh(w)
    return 2 * quantize_unit(t / (2 * t.abs().max().clamp_min(1e-12)) + 0.5, steps) - 1


class _DoReFaAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, steps: int, signed: bool) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.signed = signed
        if not signed:
            return x.clamp(0.0, 1.0).mul_(steps).round_().div_(steps)
        return x.clamp(-1.0, 1.0).add_(1).div_(2).mul_(steps).round_().div_(steps).mul_(2).sub_(1)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return mask_grad(dy, x, -1.0 if ctx.signed else 0.0, 1.0, (True, True)), None, None


def dorefa_act(x: torch.Tensor, steps: int, signed: bool) -> torch.Tensor:
    """quantize_k(clamp(x, 0, 1)); signed: the same on [-1, 1] (clamp, map to [0, 1], map back).
    dy/dx = 1 on the closed clip range, 0 outside."""
    return _DoReFaAct.apply(x, int(steps), bool(signed))


@QUANTIZERS.register("dorefa")
class DoReFaQuantizer(Quantizer):
    """DoReFa: weights through tanh normalisation (role "weight"), activations clipped to [0, 1].

    Args: as Quantizer (grad_scale and init_method are unused: nothing to learn or initialise), plus
        scale: "max" (weights multiplied by max|w|, our default, see the module docstring) or "none".
    """

    kind = "dorefa"

    def __init__(self, *args, scale: str = "max", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if scale not in SCALES:
            raise UserError(f"unknown dorefa scale '{scale}'; valid: {', '.join(SCALES)}")
        self.scale = scale
        self.steps = 2**self.bits - 1
        self.register_buffer("_out_scale", torch.ones(()), persistent=False)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "act":
            return dorefa_act(x, self.steps, self.signed)
        y = dorefa_weight(x, self.steps)
        if self.scale == "none":
            return y
        w_max = x.detach().abs().max()
        with torch.no_grad():
            self._out_scale.copy_(w_max)  # for levels(); the product uses w_max, never the buffer
        return y * w_max

    def levels(self) -> torch.Tensor:
        scale = self._out_scale.float()
        grid = torch.arange(self.steps + 1, dtype=torch.float32, device=scale.device) / self.steps
        if self.role == "act":
            return 2 * grid - 1 if self.signed else grid
        return (2 * grid - 1) * scale
