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

Gradient for x: the STE, dy/dx = 1 everywhere.

Initial basis: the uniform quantizer's binary decomposition, v_i = s 2^i (activations: levels
0, s, ..., (2^b - 1) s) or v_i = s 2^i / 2 (weights: levels +-s/2, +-3s/2, ..., no zero level), with
s the step the configured initialiser finds on the observed data (maximum over batches).
Per tensor, as every quantizer of this framework (the paper fits one basis per output channel).
"""

from __future__ import annotations

import torch

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.init import INITS


def all_codes(bits: int, signed: bool) -> torch.Tensor:
    """The 2^bits codes as rows: bit i of row r, as {0, 1} (unsigned) or {-1, +1} (signed)."""
    rows = torch.arange(2**bits)[:, None]
    bits01 = ((rows >> torch.arange(bits)[None, :]) & 1).float()
    return 2 * bits01 - 1 if signed else bits01


def nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the ascending `levels` for every element of x."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mids.to(x.dtype))


@QUANTIZERS.register("lqnets")
class LQNetsQuantizer(Quantizer):
    """LQ-Nets with a QEM-fitted basis (module docstring); no learnable parameters.

    Args: as Quantizer (init_method: the initialiser of the uniform starting basis), plus
        momentum: m of the basis moving average, in [0, 1) (0.9 here; 0 keeps the latest fit).
        qem_iters: alternations of codes / least squares per training forward (1 here).
    """

    kind = "lqnets"

    def __init__(self, *args, momentum: float = 0.9, qem_iters: int = 1, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not 0.0 <= float(momentum) < 1.0:
            raise UserError(f"lqnets momentum must be in [0, 1), got {momentum!r}")
        if not (isinstance(qem_iters, int) and qem_iters >= 1):
            raise UserError(f"lqnets qem_iters must be a positive integer, got {qem_iters!r}")
        INITS.get(self.init_method)  # an unknown initialiser fails here, not after the first batch
        self.momentum = float(momentum)
        self.qem_iters = qem_iters
        self.register_buffer("codes", all_codes(self.bits, self.signed), persistent=False)
        self.register_buffer("basis", self.uniform_basis(torch.tensor(1.0 / 2**self.bits)))
        self.register_buffer("_observed_step", torch.zeros(()), persistent=False)
        self._batches_observed = 0

    def uniform_basis(self, step: torch.Tensor) -> torch.Tensor:
        """The basis whose levels are the uniform grid of step `step` (module docstring)."""
        powers = 2.0 ** torch.arange(self.bits, dtype=torch.float32, device=step.device)
        return powers * step.float() * (0.5 if self.signed else 1.0)

    def sorted_levels(self, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels ascending, their codes) for a basis."""
        values = (self.codes.to(basis.dtype) * basis).sum(1)  # not a matmul: autocast leaves it be
        order = torch.argsort(values)
        return values[order], self.codes[order].to(basis.dtype)

    # -- QEM -------------------------------------------------------------------------------
    @torch.no_grad()
    def fit_basis(self, x: torch.Tensor) -> None:
        """One QEM round on x (qem_iters alternations), then the moving-average update."""
        with torch.autocast(x.device.type, enabled=False):  # the normal equations stay in fp32
            v = self._qem(x.flatten().to(self.basis.dtype), self.basis.clone())
        self.basis.mul_(self.momentum).add_((1.0 - self.momentum) * v)

    def _qem(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        for _ in range(self.qem_iters):
            levels, codes = self.sorted_levels(v)
            idx = nearest(x, levels)
            counts = torch.zeros_like(levels).index_add_(0, idx, torch.ones_like(x))
            sums = torch.zeros_like(levels).index_add_(0, idx, x)
            gram = codes.T @ (codes * counts[:, None])
            # A tiny ridge towards the current basis keeps a basis entry whose bit no element uses
            # (all-zero row of B^T B) where it is, instead of making the system singular.
            ridge = 1e-6 * (counts.sum() + 1.0)
            eye = torch.eye(self.bits, device=x.device, dtype=x.dtype)
            v = torch.linalg.solve_ex(gram + ridge * eye, codes.T @ sums + ridge * v).result
        return v

    # -- forward -----------------------------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.fit_basis(x.detach())
        levels, _ = self.sorted_levels(self.basis.to(x.dtype))
        q = levels[nearest(x, levels)]
        return x + (q - x).detach()

    # -- initialisation ----------------------------------------------------------------------
    def observe(self, x: torch.Tensor) -> None:
        step = INITS.get(self.init_method)(x.float(), self.qn, self.qp, self.signed)
        self._observed_step = torch.maximum(self._observed_step, step.to(self._observed_step.device))
        self._batches_observed += 1

    def end_init(self) -> None:
        super().end_init()
        if self._batches_observed:
            self.basis.copy_(self.uniform_basis(self._observed_step.clamp_min(1e-8)))

    def levels(self) -> torch.Tensor:
        return self.sorted_levels(self.basis.float())[0]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, momentum={self.momentum}, qem_iters={self.qem_iters}"
