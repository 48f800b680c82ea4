"""APoT (Li, Dong, Wang; ICLR 2020): additive powers-of-two levels with a learnable clip alpha.

Level sets. A B-bit magnitude level is a sum of terms, each term taking 0 or one power of two from
its own list: the paper's additive PoT set Q^a(alpha, kn) with base bit-width k = 2 (n = B/2 terms of
2^k = 4 values each); for odd B, APoT's code adds one 1-bit term. The powers are interleaved so
that every sum is distinct, and the set is divided by its largest sum so the top level is 1.
Written as the exponents e of each term's non-zero values 2^-e:

    B = 1: {1}                                -> {0, 1} (uniform: the ternary weight case)
    B = 2: {1, 2, 3}                          -> {0, 1/4, 1/2, 1}
    B = 3: {1, 2, 4} + {3}                    -> {0, .1, .2, .3, .4, .6, .8, 1}
    B = 4: {1, 3, 5} + {2, 4, 6}              -> 16 levels, divided by 2^-1 + 2^-2
    B = 5: {1, 3, 6} + {2, 4, 7} + {5}        -> 32 levels
    B = 6: {1, 4, 7} + {2, 5, 8} + {3, 6, 9}  -> 64 levels

Unsigned b-bit inputs (activations after ReLU) use B = b; signed inputs (weights) use B = b - 1
magnitude bits and a sign, so 2-bit weights are ternary {-alpha, 0, alpha} and b-bit weights have
2^b - 1 levels. Bit widths 2..6 are supported (APoT defines no 7- or 8-bit sets).

Forward: y = alpha * P(clamp(x / alpha, -1 or 0, 1)), P the nearest level (ties toward zero).
Gradients: APoT's reparameterised clipping function (RCF), STE through P:

    dy/dalpha = P(x/alpha) - x/alpha inside the clip range, the clipped level outside (sign(x);
    for unsigned inputs 1 above alpha and 0 below zero);
    dy/dx = 1 inside; outside 0 for activations (clipped STE) and 1 for weights (APoT's CIFAR
    code passes the weight gradient unclipped). APoT's official ImageNet code, and the nuLSQ
    authors' copy of it, clip the weight gradient at 3 bits and more (their weights go through
    clamp(-1, 1)) and pass it unclipped only for 2-bit (ternary) weights: `ste: authors`.

The op is `clip_base.clip_project` (one autograd Function, no bucketize on the fast path).

Weights are standardised first, (w - mean) / std with the statistics as constants, and the output
is left in normalised units, as in APoT's CIFAR code (`weight_norm: standardize`).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.rivals.clip_base import STE_MODES, ClipQuantizer, clip_project, mirror

# Per magnitude bit width B: for each additive term, the exponents e of its non-zero values 2^-e.
APOT_TERMS: dict[int, tuple[tuple[int, ...], ...]] = {
    1: ((1,),),
    2: ((1, 2, 3),),
    3: ((1, 2, 4), (3,)),
    4: ((1, 3, 5), (2, 4, 6)),
    5: ((1, 3, 6), (2, 4, 7), (5,)),
    6: ((1, 4, 7), (2, 5, 8), (3, 6, 9)),
}

def apot_magnitudes(magnitude_bits: int) -> torch.Tensor:
    """The 2^B ascending non-negative APoT levels for B = magnitude_bits, the largest equal to 1."""
    sums = torch.zeros(1, dtype=torch.float64)
    for exponents in APOT_TERMS[magnitude_bits]:
        values = torch.tensor([0.0] + [2.0**-e for e in exponents], dtype=torch.float64)
        sums = (sums[:, None] + values[None, :]).flatten()
    levels = torch.unique(sums)  # sorted; the interleaved exponents make every sum distinct
    return (levels / levels.max()).float()


@QUANTIZERS.register("apot")
class APoTQuantizer(ClipQuantizer):
    """APoT: additive powers-of-two levels (module docstring), learnable clip alpha.

    Args: as ClipQuantizer (clip_init defaults to "data": the supplement initialises every
    quantizer parameter of main Table 5 by the MSE method; APoT's code starts at 3.0 for normalised
    weights, 8.0 for CIFAR activations), plus
        ste: "default" (unclipped for weights as APoT's CIFAR code, clipped for activations),
            "authors" (the official ImageNet code and the nuLSQ authors': weights clipped at 3 bits
            and more, unclipped at 2 bits; activations clipped), "clipped" or "unclipped".
    """

    kind = "apot"
    supported_bits = (2, 3, 4, 5, 6)
    DEFAULT_WEIGHT_NORM: ClassVar[str] = "standardize"

    def __init__(self, *args, ste: str = "default", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clipped_ste = self._resolve_ste(ste)
        magnitude_bits = self.bits - 1 if self.signed else self.bits
        self.register_buffer("magnitudes", apot_magnitudes(magnitude_bits), persistent=False)

    def _resolve_ste(self, ste: str) -> bool:
        if ste == "default":
            return self.role == "act"
        if ste == "authors":
            return self.role == "act" or self.bits >= 3
        if ste not in STE_MODES:
            raise UserError(f"unknown apot ste '{ste}'; valid: default, authors, "
                            f"{', '.join(STE_MODES.names())}")
        return STE_MODES.get(ste)

    def clip_quantize(self, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        return clip_project(x, alpha, self.magnitudes, self.signed, self.clipped_ste)

    def unit_levels(self) -> torch.Tensor:
        return mirror(self.magnitudes, self.signed)
