"""A snapshot of every quantizer's step sizes and levels, logged once per epoch.

The snapshot is plain Python (lists of floats), so the same dict goes to metrics.jsonl and to W&B.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch import nn

from nulsq.module_names import strip_wrappers
from nulsq.quant.base import Quantizer


def _to_lists(tensors: list[torch.Tensor]) -> list[list[float]]:
    """Copy many small tensors to the host with one transfer per device (one sync, not hundreds)."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    out: list[list[float]] = [[] for _ in tensors]
    for indices in by_device.values():
        parts = [tensors[i].detach().reshape(-1).float() for i in indices]
        flat = torch.cat(parts).tolist()
        start = 0
        for i, part in zip(indices, parts):
            out[i] = flat[start : start + part.numel()]
            start += part.numel()
    return out


def quantizer_snapshot(model: nn.Module) -> dict[str, Any]:
    """Kind, role, bits, step sizes and levels of every Quantizer module of `model`.

    Args:
        model: the quantized network (possibly wrapped by DDP or torch.compile).

    Returns:
        {"layers": {module_name: {"kind", "role", "bits", "signed", "steps": list[float] | None,
        "levels": list[float]}}}, in module order.
    """
    quantizers = [(strip_wrappers(n), m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    with torch.no_grad():
        steps = [q.step_sizes() for _, q in quantizers]
        levels = [q.levels() for _, q in quantizers]
        present = [s for s in steps if s is not None]
        values = _to_lists(present + levels)
    step_values = iter(values[: len(present)])
    level_values = values[len(present) :]
    layers: dict[str, Any] = {}
    for (name, q), step, level in zip(quantizers, steps, level_values):
        layers[name] = {
            "kind": q.kind,
            "role": q.role,
            "bits": q.bits,
            "signed": q.signed,
            "steps": None if step is None else next(step_values),
            "levels": level,
        }
    return {"layers": layers}
