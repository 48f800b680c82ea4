"""The protocol a run follows around the maths: the choices where the paper is silent.

`check_switches(cfg)` rejects an unknown value of any fidelity switch at start (one line listing
the valid ones); `run_protocol(cfg, amp)` is the `protocol` dict of summary.json; `protocol_tag`
turns it into the label that keeps runs of different protocols apart in the results tables.
docs/fidelity.md explains every switch, its default and the evidence.
"""

from __future__ import annotations

from nulsq.errors import UserError
from nulsq.quant.base import GRAD_SCALES
from nulsq.quant.convert import FIRST_LAST_POLICIES
from nulsq.quant.init_protocol import check_protocol

# The authors' protocol, which the paper's numbers came from: a run that follows it is untagged.
AUTHORS = {"init_protocol": "authors", "first_last": "dynamic8", "precision": "fp32"}


def _check(value: str, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise UserError(f"unknown {key} '{value}'; valid: {', '.join(valid)}")


def check_switches(cfg) -> None:
    """Fail at start on an unknown init.protocol, quantizer.grad_scale or quantizer.first_last."""
    check_protocol(cfg.init.protocol)
    _check(cfg.quantizer.grad_scale, GRAD_SCALES, "quantizer.grad_scale")
    _check(cfg.quantizer.first_last, FIRST_LAST_POLICIES, "quantizer.first_last")


def run_protocol(cfg, amp: bool) -> dict:
    """What summary.json records of how the run was trained (beside the hyperparameters).

    Args:
        cfg: the validated run config.
        amp: whether training ran under bf16 autocast (the resolved trainer.amp).
    """
    return {
        "init_protocol": "progressive" if cfg.init.from_run else cfg.init.protocol,
        "init_method": cfg.init.method,
        "init_reduce": cfg.init.reduce,
        "grad_scale": cfg.quantizer.grad_scale,
        "first_last": cfg.quantizer.first_last,
        "precision": "bf16" if amp else "fp32",
    }


def protocol_tag(protocol: dict | None) -> str:
    """"" for a run on the authors' protocol (or one from before summaries recorded it), else
    " [...]" naming what differs: the init protocol, the gradient-scale convention, the first/last
    quantizer, the precision. Runs with different tags never average together."""
    if not protocol:
        return ""
    parts = []
    init = protocol.get("init_protocol")
    if init not in (None, "progressive", AUTHORS["init_protocol"]):
        parts.append(f"init {init}")
    if protocol.get("grad_scale") == "lsq":  # the authors' scaling counts activations per channel
        parts.append("grad_scale lsq")
    if protocol.get("first_last", AUTHORS["first_last"]) != AUTHORS["first_last"]:
        parts.append(f"first_last {protocol['first_last']}")
    if protocol.get("precision", AUTHORS["precision"]) != AUTHORS["precision"]:
        parts.append(protocol["precision"])
    return f" [{', '.join(parts)}]" if parts else ""
