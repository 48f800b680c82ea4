"""The stages of a run, planned from the config alone: what trains, for how long, with which
optimizers and learning-rate schedule.

A quantized run may have two stages: "fp", full-precision training inside the same run (the
embedded demo; `pretrain.*` sets its lr, weight decay and warm-up), then "qat", quantization-aware
training (`optim.*`, `schedule.*`, `trainer.epochs`). A full-precision run (quantizer=fp) has one
"fp" stage with `optim.*` and `schedule.*`. The preflight builds every stage's optimizers and
schedules from this plan before any work, the trainer builds them again for the real model, and
scripts/bench.py times the step of the last stage: all three read the same plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nulsq.train.optim import build_optimizers, build_schedulers


@dataclass(frozen=True)
class StagePlan:
    """One training stage as the config asks for it.

    Args:
        name: "fp" (full precision) or "qat" (quantization-aware training).
        epochs: epochs of this stage.
        optim: the `optim` groups (weights, quant) this stage's optimizers are built from.
        schedule: the `schedule` (name, warmup_epochs, warmup_lr) of this stage.
        step_guard: "stop" | "clamp" for QAT (quantizer.step_guard), "none" for FP.
        quantized: whether the model is quantized during this stage.
    """

    name: str
    epochs: int
    optim: DictConfig
    schedule: DictConfig
    step_guard: str
    quantized: bool


def is_quantized(cfg: DictConfig) -> bool:
    """True when the config quantizes weights or activations (any quantizer but fp)."""
    return cfg.quantizer.weight is not None or cfg.quantizer.act is not None


def plan_stages(cfg: DictConfig) -> list[StagePlan]:
    """The stages `cfg` trains, in order (FP, then QAT when quantized); never empty for a config
    the preflight accepted (trainer.epochs > 0)."""
    quantized = is_quantized(cfg)
    stages = []
    fp_epochs = cfg.pretrain.epochs if quantized else cfg.trainer.epochs
    if fp_epochs > 0:
        optim_cfg, sched_cfg = cfg.optim, cfg.schedule
        if quantized:  # the demo's FP stage has its own lr, weight decay and warm-up
            optim_cfg = OmegaConf.create({
                "weights": {**cfg.optim.weights, "lr": cfg.pretrain.lr,
                            "weight_decay": cfg.pretrain.weight_decay},
                "quant": cfg.optim.quant})
            sched_cfg = OmegaConf.create({"name": "cosine", "warmup_lr": 0.0,
                                          "warmup_epochs": cfg.pretrain.warmup_epochs})
        stages.append(StagePlan("fp", fp_epochs, optim_cfg, sched_cfg, "none", quantized=False))
    if quantized:
        stages.append(StagePlan("qat", cfg.trainer.epochs, cfg.optim, cfg.schedule,
                                str(cfg.quantizer.step_guard), quantized=True))
    return stages


Optimizers = dict[str, torch.optim.Optimizer]  # parameter group ("weights", "quant") -> optimizer
Schedulers = dict[str, torch.optim.lr_scheduler.LambdaLR]  # the same keys -> its per-step schedule


def build_stage_optim(model: nn.Module, stage: StagePlan, steps_per_epoch: int
                      ) -> tuple[Optimizers, Schedulers]:
    """The optimizers (one per non-empty parameter group) and per-step schedulers of `stage` for
    `model`'s parameters; raises UserError for a value that cannot train (lr <= 0, ...)."""
    optimizers = build_optimizers(model, stage.optim)
    schedulers = build_schedulers(optimizers, stage.schedule, stage.optim, steps_per_epoch,
                                  stage.epochs)
    return optimizers, schedulers
