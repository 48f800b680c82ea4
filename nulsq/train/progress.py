"""The periodic progress line: stage, epoch, step, loss, learning rates, images/s and ETA."""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    """Logs one line per log interval on the main rank; ETA from the stage's mean step time."""

    def __init__(self, state, enabled: bool) -> None:
        self.state = state
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.step0 = state.step

    def update(self, loss: float, images_per_s: float, lrs: dict) -> None:
        if not self.enabled:
            return
        s = self.state
        done = s.step - self.step0
        per_step = (time.perf_counter() - self.t0) / max(done, 1)
        eta = per_step * (s.total_steps - s.step)
        lr_text = " ".join(f"{k[3:]} {v:.3g}" for k, v in lrs.items())
        log.info(
            f"[{s.stage}] epoch {s.epoch + 1}/{s.epochs} step {s.steps_into_epoch}/{s.steps_per_epoch} "
            f"loss {loss:.4f} lr {lr_text} | {images_per_s:,.0f} img/s | ETA {format_seconds(eta)}"
        )
