"""Where and how a run computes: device, bf16 autocast, channels_last, torch.compile, seeds.

"auto" means: on for CUDA, off for CPU (CPU bf16 autocast and compile are opt-in).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from nulsq.config import Device
from nulsq.errors import UserError

_DEVICES = Device.values()


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp: bool
    channels_last: bool
    compile: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


def _resolve(flag, default: bool, key: str) -> bool:
    if flag == "auto" or flag is None:
        return default
    if isinstance(flag, bool):
        return flag
    raise UserError(f"trainer.{key} must be auto, true or false, got {flag!r}")


def resolve_runtime(trainer_cfg, local_rank: int = 0) -> Runtime:
    """Turn the trainer's auto/true/false switches into concrete choices for this machine."""
    if trainer_cfg.device not in _DEVICES:
        raise UserError(f"unknown trainer.device '{trainer_cfg.device}'; valid: {', '.join(_DEVICES)}")
    want_cuda = trainer_cfg.device == "cuda" or (
        trainer_cfg.device == "auto" and torch.cuda.is_available()
    )
    if want_cuda and not torch.cuda.is_available():
        raise UserError("trainer.device=cuda but no CUDA GPU is visible; use trainer.device=cpu")
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    cuda = device.type == "cuda"
    return Runtime(
        device=device,
        amp=_resolve(trainer_cfg.amp, cuda, "amp"),
        channels_last=_resolve(trainer_cfg.channels_last, cuda, "channels_last"),
        compile=_resolve(trainer_cfg.compile, cuda, "compile"),
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
