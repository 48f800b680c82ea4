"""Parameter groups, their optimizers, and the warm-up + cosine learning-rate schedule.

Two groups, each with its own optimizer as in the paper: "weights" (every network parameter) and
"quant" (every parameter a Quantizer module owns: step sizes, clipping thresholds, ...).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import quantizer_parameters
from nulsq.registry import Registry

OPTIMIZERS: Registry[Callable[..., torch.optim.Optimizer]] = Registry("optimizer")


@OPTIMIZERS.register("sgd")
def _sgd(params, g) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        params, lr=g.lr, momentum=g.momentum, nesterov=g.nesterov, weight_decay=g.weight_decay
    )


@OPTIMIZERS.register("adamw")
def _adamw(params, g) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        params, lr=g.lr, betas=tuple(g.betas), eps=g.eps, weight_decay=g.weight_decay
    )


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def _constant(progress: float) -> float:
    return 1.0


# schedule.name (the schema's ScheduleName) -> lr multiplier at progress in [0, 1] after warm-up
SCHEDULES: dict[str, Callable[[float], float]] = {"cosine": _cosine, "constant": _constant}


def split_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """{"weights": network parameters, "quant": quantizer parameters}, disjoint."""
    quant = quantizer_parameters(model)
    ids = {id(p) for p in quant}
    weights = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    return {"weights": weights, "quant": quant}


def check_group(name: str, g) -> None:
    """Reject values that cannot train before any work is done."""
    if not g.lr > 0:
        raise UserError(f"optim.{name}.lr must be > 0, got {g.lr}")
    if g.weight_decay < 0:
        raise UserError(f"optim.{name}.weight_decay must be >= 0, got {g.weight_decay}")
    if g.nesterov and g.name == "sgd" and not g.momentum > 0:
        raise UserError(f"optim.{name}.nesterov needs optim.{name}.momentum > 0")


def build_optimizers(model: nn.Module, optim_cfg) -> dict[str, torch.optim.Optimizer]:
    """One optimizer per non-empty group, from `optim.weights` and `optim.quant`."""
    optimizers = {}
    for name, params in split_parameters(model).items():
        g = optim_cfg[name]
        check_group(name, g)
        builder = OPTIMIZERS.get(g.name)
        if params:
            optimizers[name] = builder(params, g)
    return optimizers


def lr_factor(step: int, total_steps: int, warmup_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based).

    Linear warm-up from warmup_lr (= warmup_ratio * lr) to lr over `warmup_steps`, then the named
    decay over the remaining steps (cosine reaches zero at `total_steps`).
    """
    if step < warmup_steps:
        return warmup_ratio + (1.0 - warmup_ratio) * step / warmup_steps
    decay = SCHEDULES[schedule]
    return decay((step - warmup_steps) / max(1, total_steps - warmup_steps))


def build_schedulers(
    optimizers: dict[str, torch.optim.Optimizer],
    sched_cfg,
    optim_cfg,
    steps_per_epoch: int,
    epochs: int,
) -> dict[str, torch.optim.lr_scheduler.LambdaLR]:
    """A per-step LambdaLR for each optimizer (stepped once per optimizer step)."""
    if sched_cfg.name not in SCHEDULES:  # fail early on an unknown name
        raise UserError(f"unknown schedule.name '{sched_cfg.name}'; valid: {', '.join(SCHEDULES)}")
    total = steps_per_epoch * epochs
    warmup = int(round(sched_cfg.warmup_epochs * steps_per_epoch))
    schedulers = {}
    for name, opt in optimizers.items():
        base_lr = optim_cfg[name].lr
        ratio = sched_cfg.warmup_lr / base_lr if warmup > 0 else 1.0

        def factor(step: int, ratio: float = ratio) -> float:
            return lr_factor(step, total, warmup, ratio, sched_cfg.name)

        schedulers[name] = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return schedulers
