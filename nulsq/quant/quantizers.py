"""The paper's own quantizer modules: LSQ, nuLSQ, and the 8-bit dynamic quantizer of first/last layers.

Each wraps an op of `nulsq.quant.functional` (the maths, supplement Eqs. 4 and 10-12) and owns its
step sizes as parameters. Initial steps come from `nulsq.quant.init` (the maximum over the observed
batches); nuLSQ starts from the uniform grid that LSQ's init gives.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant import functional as F
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.init import INITS
from nulsq.quant.progressive import merge_adjacent


class _ObservedStep(Quantizer):
    """Shared init logic: the step a named initialiser gives, maximised over observed batches."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("_init_max", torch.zeros(()), persistent=False)
        self.register_buffer("_init_sum", torch.zeros(()), persistent=False)
        self._init_count = 0

    def observe(self, x: torch.Tensor) -> None:
        step = INITS.get(self.init_method)(x.float(), self.qn, self.qp, self.signed)
        self._init_max = torch.maximum(self._init_max.to(step.device), step)
        self._init_sum = self._init_sum.to(step.device) + step
        self._init_count += 1

    def initial_step(self) -> torch.Tensor:
        step = self._init_max if self.init_reduce == "max" else self._init_sum / max(self._init_count, 1)
        # A layer that saw only zeros would get step 0: keep it positive so the guard stays quiet.
        return step.clamp_min(1e-8)


@QUANTIZERS.register("lsq")
class LSQQuantizer(_ObservedStep):
    """LSQ (Esser et al.): one learnable step s; levels s * {-Qn, ..., Qp}."""

    kind = "lsq"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.step = nn.Parameter(torch.ones(()))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return F.lsq(x, self.step, self.qn, self.qp, self.grad_scale(x))

    def end_init(self) -> None:
        super().end_init()
        with torch.no_grad():
            self.step.copy_(self.initial_step())

    def levels(self) -> torch.Tensor:
        grid = torch.arange(-self.qn, self.qp + 1, device=self.step.device, dtype=torch.float32)
        return grid * self.step.detach().float()

    def step_sizes(self) -> torch.Tensor:
        return self.step.detach().reshape(1)

    def step_parameters(self) -> list[nn.Parameter]:
        return [self.step]

    @torch.no_grad()
    def merge_from(self, old: dict[str, torch.Tensor]) -> None:
        # Keeping every second level of a uniform grid doubles its step.
        self.step.copy_(2 * old["step"].reshape(()))


@QUANTIZERS.register("nulsq")
class NuLSQQuantizer(_ObservedStep):
    """nuLSQ: Qp positive steps s_k and Qn negative steps s'_k, each learnable (supplement Eq. 5).

    Unsigned (activations after ReLU): Qp = 2^b - 1 positive steps, no negative side.
    Symmetric/signed (weights, signed activations): Qn = 2^(b-1) negative and Qp = 2^(b-1) - 1
    positive steps, counted outward from zero.
    """

    kind = "nulsq"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pos_steps = nn.Parameter(torch.ones(self.qp))
        self.neg_steps = nn.Parameter(torch.ones(self.qn)) if self.qn > 0 else None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.neg_steps is None or self.grad_scale_mode != "authors":
            return F.nulsq(x, self.pos_steps, self.neg_steps, self.grad_scale(x))
        # The authors' symmetric nuLSQ: 2/sqrt(N*Qn) on the negative steps, 2/sqrt(N*Qp) on the
        # positive ones (twice LSQ's scale, each side with its own level count).
        n = self.grad_scale_count(x)
        neg = F.scale_grad(self.neg_steps, 2.0 / math.sqrt(n * self.qn))
        pos = F.scale_grad(self.pos_steps, 2.0 / math.sqrt(n * self.qp))
        return F.nulsq(x, pos, neg, 1.0)

    def end_init(self) -> None:
        super().end_init()
        with torch.no_grad():
            step = self.initial_step()
            self.pos_steps.copy_(step.expand_as(self.pos_steps))
            if self.neg_steps is not None:
                self.neg_steps.copy_(step.expand_as(self.neg_steps))

    def levels(self) -> torch.Tensor:
        pos = torch.cumsum(self.pos_steps.detach().float(), 0)
        zero = torch.zeros(1, device=pos.device)
        if self.neg_steps is None:
            return torch.cat([zero, pos])
        neg = -torch.cumsum(self.neg_steps.detach().float(), 0).flip(0)
        return torch.cat([neg, zero, pos])

    def step_sizes(self) -> torch.Tensor:
        steps = [self.pos_steps.detach()]
        if self.neg_steps is not None:
            steps.append(self.neg_steps.detach())
        return torch.cat(steps)

    def step_parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.pos_steps, self.neg_steps) if p is not None]

    @torch.no_grad()
    def merge_from(self, old: dict[str, torch.Tensor]) -> None:
        self.pos_steps.copy_(merge_adjacent(old["pos_steps"], self.qp))
        if self.neg_steps is not None:
            self.neg_steps.copy_(merge_adjacent(old["neg_steps"], self.qn))


DYNAMIC_MAX_CONVENTIONS = ("authors", "absmax")


@QUANTIZERS.register("dynamic_max")
class DynamicMaxQuantizer(Quantizer):
    """Uniform quantizer whose scale is the current tensor's maximum (first/last layers, 8 bits);
    nothing to learn, and the scale is not differentiated.

    Args: as Quantizer, plus
        convention: "authors" (their first/last quantizer): m = max(x), the signed maximum,
            y = round(x / m * Qp) / Qp * m with no clamp (Qp = 127 for weights and signed inputs,
            255 for unsigned ones) and dy/dx = 1 everywhere. "absmax": m = max|x|, y = the LSQ
            grid {-Qn, ..., Qp} * m/Qp with clamping and LSQ's STE. They differ where
            min(x) < -max(x) (authors: codes below -Qp, no clamp) and in the rounding order.
    """

    kind = "dynamic_max"

    def __init__(self, *args, convention: str = "authors", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if convention not in DYNAMIC_MAX_CONVENTIONS:
            raise UserError(f"unknown dynamic_max convention '{convention}'; valid: "
                            f"{', '.join(DYNAMIC_MAX_CONVENTIONS)}")
        self.convention = convention

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.convention == "absmax":
            step = (x.detach().abs().amax().float() / max(self.qp, 1)).clamp_min(1e-12)
            return F.lsq(x, step, self.qn, self.qp, 1.0)
        xf = x.float()
        m = xf.detach().amax()
        m = torch.where(m == 0, torch.ones_like(m), m)  # an all-zero tensor stays zero, not NaN
        # The authors' order of operations (x/m*Qp, then /Qp*m): another order flips codes.
        q = xf.detach().div(m).mul(self.qp).round().div(self.qp).mul(m)
        y = xf + (q - xf.detach())
        return y if y.dtype == x.dtype else y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, convention={self.convention}"
