"""The quantizer module contract and the registry of quantizer kinds.

A quantizer fake-quantizes one tensor: a layer's weight (role "weight") or its input activation
(role "act"). It owns its learnable parameters, so the trainer finds them by type
(`quantizer_parameters`) and gives them their own optimizer, never by name matching.

Initialisation runs before training: `begin_init()` switches every quantizer to observing, the
trainer pushes `init.batches` training batches through the model, then `end_init()` sets the
parameters (the maximum over batches, as the authors do). While observing, a quantizer records a
statistic of each batch and then either passes x through unchanged (`init.protocol=fp_eval`) or,
as the authors' code does (`init.protocol=authors`), sets its parameters from the statistics so far
and quantizes x with them, so the layers after it observe the quantized network's values. For
that, `end_init()` must be idempotent: it sets the parameters from what was observed so far.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.registry import Registry

QUANTIZERS: Registry[type["Quantizer"]] = Registry("quantizer kind")
INIT_REDUCTIONS = ("max", "mean")
# none: g = 1; lsq: Esser et al.'s g = 1/sqrt(N*Qp), N = elements per sample (activations);
# authors: the authors' code, N = channel count (activations); see `Quantizer.grad_scale`.
GRAD_SCALES = ("none", "lsq", "authors")


def signed_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp) of a b-bit grid: signed -> (2^(b-1), 2^(b-1)-1), unsigned -> (0, 2^b-1)."""
    if signed:
        return 2 ** (bits - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


class Quantizer(nn.Module):
    """Base class: fake-quantizes a tensor; subclasses implement `quantize`.

    Args:
        bits: bit width b.
        signed: signed grid (weights, signed activations) or unsigned (activations after ReLU).
        role: "weight" or "act"; decides the element count N of LSQ's gradient scale.
        grad_scale: one of GRAD_SCALES: "none" (scale 1), "lsq" (1/sqrt(N*Qp), N = numel for
            weights, elements per sample for activations: Esser et al.) or "authors" (the
            authors' code: N = numel for weights, the channel count for activations; symmetric
            nuLSQ scales its negative steps by 2/sqrt(N*Qn) and its positive ones by 2/sqrt(N*Qp)).
        init_method: name of the initialiser in `nulsq.quant.init` used by `observe`.
        init_reduce: how per-batch initial values combine: "max" (the authors' code) or "mean"
            (supplement D-III: the mean over the first 1,000 batches).
    """

    supported_bits: ClassVar[tuple[int, ...]] = tuple(range(2, 9))
    kind: ClassVar[str] = "base"

    def __init__(
        self,
        bits: int,
        signed: bool,
        role: str,
        grad_scale: str = "none",
        init_method: str = "lsq",
        init_reduce: str = "max",
    ) -> None:
        super().__init__()
        if bits not in self.supported_bits:
            raise UserError(
                f"quantizer '{self.kind}' does not support {bits} bits; supported: "
                f"{', '.join(map(str, self.supported_bits))}"
            )
        if role not in ("weight", "act"):
            raise ValueError(f"role must be 'weight' or 'act', got {role!r}")
        if grad_scale not in GRAD_SCALES:
            raise UserError(f"unknown quantizer.grad_scale '{grad_scale}'; valid: {', '.join(GRAD_SCALES)}")
        if init_reduce not in INIT_REDUCTIONS:
            raise UserError(f"unknown init.reduce '{init_reduce}'; valid: {', '.join(INIT_REDUCTIONS)}")
        self.init_reduce = init_reduce
        self.bits = bits
        self.signed = signed
        self.role = role
        self.grad_scale_mode = grad_scale
        self.init_method = init_method
        self.qn, self.qp = signed_range(bits, signed)
        self.observing = False
        self.quantize_while_observing = False
        # Where an activation's channels are, for grad_scale "authors": 1 (NCHW convolutions,
        # (B, C) linear inputs); `quantize_model` sets -1 for Linear layers (token inputs).
        self.channel_dim = 1

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x.detach())
            if not self.quantize_while_observing:
                return x
            # init.protocol=authors: quantize this batch with the estimate so far.
            self.end_init()
            self.observing = True
        return self.quantize(x)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grad_scale(self, x: torch.Tensor) -> float:
        """g = 1/sqrt(N*Qp) of the step gradient (1 under "none"); see `grad_scale_count`."""
        if self.grad_scale_mode == "none":
            return 1.0
        return 1.0 / math.sqrt(self.grad_scale_count(x) * max(self.qp, 1))

    def grad_scale_count(self, x: torch.Tensor) -> int:
        """N of the gradient scale: numel for weights; for activations the elements per sample
        ("lsq", Esser et al.) or the channel count ("authors": x.shape[1] in their code, the
        last dimension for a Linear layer's input here, the same for (B, C) inputs)."""
        if self.role == "weight" or x.dim() < 2:
            return x.numel()
        if self.grad_scale_mode == "authors":
            return x.shape[self.channel_dim]
        return x[0].numel()

    # -- initialisation ----------------------------------------------------------------------
    def begin_init(self, quantize: bool = False) -> None:
        """Start observing; `quantize`: quantize each observed batch with the estimate so far
        (init.protocol=authors) instead of passing it through (fp_eval)."""
        self.observing = True
        self.quantize_while_observing = quantize

    def observe(self, x: torch.Tensor) -> None:
        """Record an initialisation statistic of one batch (default: nothing to learn)."""

    def end_init(self) -> None:
        """Stop observing and set the parameters from the statistics (idempotent)."""
        self.observing = False

    # -- inspection (logging, plots, guards) --------------------------------------------------
    def levels(self) -> torch.Tensor:
        """The representable values, ascending, as a 1-D float tensor (empty if data-dependent)."""
        return torch.empty(0)

    def step_sizes(self) -> torch.Tensor | None:
        """The learnable step sizes that must stay positive, flattened; None if none."""
        return None

    def step_parameters(self) -> list[nn.Parameter]:
        """The parameters behind `step_sizes()` (clamped when quantizer.step_guard=clamp)."""
        return []

    def merge_from(self, old: dict[str, torch.Tensor]) -> None:
        """Progressive fine-tuning (supplement D-III): set this b-bit quantizer's parameters from
        the same layer's (b+1)-bit ones (`old`: parameter name -> tensor)."""
        raise UserError(
            f"quantizer '{self.kind}' cannot be initialised from a higher-bit run; "
            f"unset init.from_run or use lsq/nulsq"
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, role={self.role}"


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every learnable parameter owned by a Quantizer module of `model` (the 'quant' group)."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Quantizer):
            for p in module.parameters(recurse=False):
                if p.requires_grad and id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
    return params
