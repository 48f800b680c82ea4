"""Model conversion: swap every Conv2d/Linear for a twin that quantizes its weight and its input.

Per-tensor quantizers, as in the authors' code. The first and the last layer follow
`quantizer.first_last`: "dynamic8" (the authors: 8-bit max-based dynamic quantizers, their
convention), "dynamic8_absmax" (max|x| on a clamped grid), "fp" (left in full precision) or "same"
(the configured quantizers and bits). Activations are unsigned (after
ReLU) except the first layer's input (the normalised image) and models whose activations are
signed (Swin-T, ConvNeXt: GELU/LayerNorm), or as `quantizer.signed_act` says.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS, Quantizer
from nulsq.quant.init_protocol import initialize_quantizers  # noqa: F401  (its historical home)

# dynamic8: the authors' 8-bit first/last quantizer (signed max, no clamp); dynamic8_absmax: max|x|
# on the clamped 8-bit grid; fp: left in full precision; same: the configured quantizers and bits.
FIRST_LAST_POLICIES = ("dynamic8", "dynamic8_absmax", "fp", "same")
_DYNAMIC8 = {"dynamic8": "authors", "dynamic8_absmax": "absmax"}


class QuantConv2d(nn.Conv2d):
    """nn.Conv2d whose weight and input pass through their quantizers first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.act_quant(x), self.weight_quant(self.weight), self.bias)


class QuantLinear(nn.Linear):
    """nn.Linear whose weight and input pass through their quantizers first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TF.linear(self.act_quant(x), self.weight_quant(self.weight), self.bias)


_TWINS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}


@dataclass
class LayerPlan:
    """Which quantizers one layer got (a row of the printed table)."""

    name: str
    layer: str
    weight: str
    act: str


def _make(role_cfg, bits: int, signed: bool, role: str, qcfg, init_method: str,
          init_reduce: str) -> Quantizer:
    cls = QUANTIZERS.get(role_cfg["kind"])
    return cls(
        bits=bits,
        signed=signed,
        role=role,
        grad_scale=qcfg.grad_scale,
        init_method=init_method,
        init_reduce=init_reduce,
        **dict(role_cfg.get("args") or {}),
    )


def _describe(q: Quantizer) -> str:
    return f"{q.kind} {q.bits}b {'signed' if q.signed else 'unsigned'}"


def quantize_model(
    model: nn.Module,
    qcfg,
    signed_activations: bool = False,
    init_method: str = "lsq",
    verbose: bool = True,
    init_reduce: str = "max",
) -> list[LayerPlan]:
    """Replace, in place, every Conv2d/Linear of `model` by its quantized twin.

    Args:
        model: a full-precision network; its parameters are kept (the twins share them).
        qcfg: the `quantizer` config (name, bits, weight/act kinds and args, grad_scale, first_last,
            signed_act).
        signed_activations: the model's default for activation signedness (ModelSpec).
        init_method: step initialiser name used while observing (`init.method`).
        init_reduce: "max" or "mean" over the observed batches (`init.reduce`).
        verbose: print the table of which layer got which quantizer.

    Returns:
        One LayerPlan per layer, in model order (empty for the full-precision quantizer).
    """
    if qcfg.weight is None and qcfg.act is None:
        return []
    if qcfg.first_last not in FIRST_LAST_POLICIES:
        raise UserError(
            f"unknown quantizer.first_last '{qcfg.first_last}'; valid: {', '.join(FIRST_LAST_POLICIES)}"
        )
    signed_act = signed_activations if qcfg.signed_act is None else bool(qcfg.signed_act)
    layers = [(n, m) for n, m in model.named_modules() if type(m) in _TWINS]
    if not layers:
        raise UserError("quantize_model found no Conv2d or Linear layer in the model")
    edge = {layers[0][0], layers[-1][0]}
    plans = []
    for name, module in layers:
        is_first = name == layers[0][0]
        act_signed = signed_act or is_first
        if name in edge and qcfg.first_last == "fp":
            plans.append(LayerPlan(name, type(module).__name__, "fp", "fp"))
            continue
        if name in edge and qcfg.first_last in _DYNAMIC8:
            wq_cfg = aq_cfg = {"kind": "dynamic_max", "args": {"convention": _DYNAMIC8[qcfg.first_last]}}
            bits = 8
        else:
            wq_cfg, aq_cfg, bits = qcfg.weight, qcfg.act, qcfg.bits
        wq = _make(wq_cfg, bits, True, "weight", qcfg, init_method, init_reduce) if wq_cfg else nn.Identity()
        aq = _make(aq_cfg, bits, act_signed, "act", qcfg, init_method, init_reduce) if aq_cfg else nn.Identity()
        if isinstance(module, nn.Linear) and isinstance(aq, Quantizer):
            aq.channel_dim = -1  # a Linear's features are its input's last dimension
        module.__class__ = _TWINS[type(module)]  # keeps the Parameters (and optimizer refs) as they are
        module.add_module("weight_quant", wq.to(module.weight.device))
        module.add_module("act_quant", aq.to(module.weight.device))
        describe = lambda q: _describe(q) if isinstance(q, Quantizer) else "fp"  # noqa: E731
        plans.append(LayerPlan(name, type(module).__name__, describe(wq), describe(aq)))
    if verbose:
        print(format_plan(plans))
    return plans


def format_plan(plans: list[LayerPlan]) -> str:
    """The table printed at conversion: layer, type, weight quantizer, activation quantizer."""
    rows = [("layer", "type", "weight", "activation")] + [
        (p.name, p.layer, p.weight, p.act) for p in plans
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def quantizers(model: nn.Module) -> dict[str, Quantizer]:
    """Every Quantizer module of `model` by its qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Quantizer)}
