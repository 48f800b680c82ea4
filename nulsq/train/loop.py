"""The one training loop: an epoch of steps, and evaluation.

Hot-path rule: no host sync per step. Loss and accuracy accumulate on the device and are read
only at the log interval, where the NaN-loss and step-size checks also happen.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as TF
from torch import nn

from nulsq.errors import UserError
from nulsq.train.distributed import DistInfo, all_reduce_sum
from nulsq.train.guards import check_step_sizes, clamp_step_sizes
from nulsq.train.progress import Progress
from nulsq.train.runtime import Runtime


class NaNLossError(UserError):
    """The training loss became NaN or infinite."""


_NAN_ADVICE = ("stopped without checkpointing it (checkpoints/last.pt, if any, is the last good "
               "state); lower optim.weights.lr or optim.quant.lr")


@dataclass
class StageState:
    """Counters of one training stage ("fp" or "qat"), saved in checkpoints."""

    stage: str
    epochs: int
    steps_per_epoch: int
    epoch: int = 0  # the next epoch to run
    step: int = 0  # optimizer steps done in this stage
    best_top1: float = -1.0
    best_epoch: int = -1
    images_seen: int = 0
    train_seconds: float = 0.0
    step_offset: int = 0  # steps of earlier stages, so logged step numbers keep increasing
    fp_top1: float | None = None  # the FP model's top-1 this QAT stage started from
    partial: list = field(default_factory=lambda: [0.0, 0.0, 0.0])  # loss sum, correct, count so far
    history: list = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def steps_into_epoch(self) -> int:
        return self.step - self.epoch * self.steps_per_epoch


@dataclass
class StepContext:
    """What train_epoch needs besides the model and the data."""

    runtime: Runtime
    dist: DistInfo
    optimizers: dict
    schedulers: dict
    log: object  # RunLogger
    log_interval: int
    max_steps: int | None
    step_guard: str
    step_floor: float


def _top_k_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    k_max = min(max(ks), logits.shape[1])
    top = logits.topk(k_max, dim=1).indices
    hits = top.eq(labels[:, None])
    return [hits[:, : min(k, k_max)].any(dim=1).sum() for k in ks]


def _mean_over_ranks(loss: torch.Tensor, dist: DistInfo) -> float:
    """The loss averaged over ranks, so every rank sees the same NaN and stops at the same step."""
    total = all_reduce_sum(loss.detach().float().reshape(1).clone(), dist)
    return float(total) / dist.world_size


def _all_finite(model: nn.Module) -> bool:
    """True when no parameter holds NaN or inf (one host sync)."""
    flags = [p.detach().isfinite().all() for p in model.parameters()]
    return bool(torch.stack(flags).all()) if flags else True


def train_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, optimizers: dict,
               schedulers: dict, autocast: Callable[[], ContextManager]) -> tuple[torch.Tensor, torch.Tensor]:
    """One training step: forward under `autocast()`, cross-entropy, backward, then every
    optimizer's step and its per-step schedule's. Returns (logits, loss) on the device: no host
    sync. The trainer's loop and scripts/bench.py both call it.

    Args:
        model: the module to call (DDP- or torch.compile-wrapped as the runtime says).
        images, labels: one batch, on the model's device.
        optimizers: parameter group ("weights", "quant") -> optimizer (nulsq.train.plan).
        schedulers: the same keys -> LambdaLR, stepped once per optimizer step.
        autocast: the runtime's autocast context factory (`Runtime.autocast`).
    """
    with autocast():
        logits = model(images)
        loss = TF.cross_entropy(logits, labels)
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for name, opt in optimizers.items():
        opt.step()
        schedulers[name].step()
    return logits, loss


def train_epoch(model: nn.Module, raw_model: nn.Module, loader, state: StageState, ctx: StepContext) -> dict:
    """Run the rest of the current epoch (or until max_steps); returns train loss and top-1 over
    the epoch. A checkpoint taken mid-epoch resumes here: the loader's order depends only on
    (seed, epoch), and the caller's `loader.set_epoch(epoch, skip=state.steps_into_epoch)` makes
    it start after the batches already done, so the sequence continues."""
    model.train()
    device = ctx.runtime.device
    loss_sum, correct, count = (torch.tensor(v, device=device) for v in state.partial)
    progress = Progress(state, ctx.dist.is_main)
    t0 = time.perf_counter()
    window_t, window_images, processed = t0, 0, 0
    for images, labels in loader:
        if ctx.max_steps is not None and state.step >= ctx.max_steps:
            break
        if ctx.runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        logits, loss = train_step(model, images, labels, ctx.optimizers, ctx.schedulers,
                                  ctx.runtime.autocast)
        if ctx.step_guard == "clamp":
            clamp_step_sizes(raw_model, ctx.step_floor)
        batch = labels.shape[0]
        loss_sum += loss.detach().float() * batch
        correct += (logits.detach().argmax(1) == labels).sum().float()
        count += batch
        processed += batch
        state.step += 1
        window_images += batch * ctx.dist.world_size
        if state.step % ctx.log_interval == 0 or state.step == state.total_steps:
            loss_value = _mean_over_ranks(loss, ctx.dist)  # the sync of this interval
            if not math.isfinite(loss_value):
                raise NaNLossError(
                    f"training loss became {loss_value} at {state.stage} step {state.step}; "
                    f"{_NAN_ADVICE}"
                )
            if ctx.step_guard == "stop":
                check_step_sizes(raw_model)
            now = time.perf_counter()
            ips = window_images / max(now - window_t, 1e-9)
            window_t, window_images = now, 0
            lrs = {f"lr/{n}": opt.param_groups[0]["lr"] for n, opt in ctx.optimizers.items()}
            epoch_f = state.epoch + state.steps_into_epoch / state.steps_per_epoch
            ctx.log.log("step", {"stage": state.stage, "loss": loss_value, "images_per_s": ips,
                                 "epoch": epoch_f, **lrs}, step=state.step_offset + state.step)
            progress.update(loss_value, ips, lrs)
    elapsed = time.perf_counter() - t0
    totals = all_reduce_sum(torch.stack([loss_sum, correct, count]).float(), ctx.dist).tolist()
    loss_total, correct_total, n = totals
    # A NaN after the last logged step must not reach the checkpoint the caller writes next.
    if not math.isfinite(loss_total) or not _all_finite(raw_model):
        raise NaNLossError(
            f"training became non-finite in {state.stage} epoch {state.epoch + 1} (by step "
            f"{state.step}); {_NAN_ADVICE}"
        )
    done = state.steps_into_epoch >= state.steps_per_epoch
    # Rank 0 saves the checkpoint, so it keeps the sums of all ranks (other ranks restart at 0).
    state.partial = [0.0, 0.0, 0.0] if done else totals
    state.images_seen += processed * ctx.dist.world_size
    state.train_seconds += elapsed
    return {
        "train/loss": loss_total / max(n, 1),
        "train/top1": 100.0 * correct_total / max(n, 1),
        "train/images_per_s": processed * ctx.dist.world_size / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader, runtime: Runtime, dist: DistInfo) -> dict:
    """Top-1/top-5 (%) and mean loss over the whole validation split (summed over ranks)."""
    model.eval()
    device = runtime.device
    sums = torch.zeros(4, device=device)  # loss, top1, top5, count
    for images, labels in loader:
        if runtime.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(images)
        logits = logits.float()
        top1, top5 = _top_k_correct(logits, labels)
        sums += torch.stack([
            TF.cross_entropy(logits, labels, reduction="sum"), top1.float(), top5.float(),
            torch.tensor(float(labels.shape[0]), device=device),
        ])
    loss, top1, top5, n = all_reduce_sum(sums, dist).tolist()
    if n == 0:
        raise UserError("the validation split is empty; check dataset.val_split and dataset.root")
    return {"val/loss": loss / n, "val/top1": 100.0 * top1 / n, "val/top5": 100.0 * top5 / n}
