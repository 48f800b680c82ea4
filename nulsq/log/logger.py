"""The one logger the trainer talks to: every event to metrics.jsonl, and to W&B when enabled."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping

from omegaconf import DictConfig, OmegaConf

from nulsq.log.console import attach_run_log, detach
from nulsq.log.jsonl import JsonlWriter, read_metrics
from nulsq.log.wandb_run import WandbRun

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Writes each event as one line of `<run_dir>/metrics.jsonl` and mirrors it to W&B; while it
    is open, console lines also go to `<run_dir>/train.log` (see console.py).

    Args:
        run_dir: the run directory.
        wandb_run: a started W&B run, or None for JSONL only.
    """

    def __init__(self, run_dir: Path, wandb_run: WandbRun | None = None, replay: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self._jsonl = JsonlWriter(self.path)
        self._log_file = attach_run_log(Path(run_dir))
        self._wandb = wandb_run
        self._last_step = 0
        if replay and self._wandb:
            for record in history_to_replay(read_metrics(self.path)):
                data = {k: v for k, v in record.items() if k not in ("event", "step", "time")}
                if not self._wandb.log(record["event"], data, record["step"]):
                    self._wandb = None
                    break

    @property
    def wandb_id(self) -> str | None:
        """The W&B run id (stored in checkpoints so a resumed run continues it); None without W&B."""
        return self._wandb.id if self._wandb else None

    def log(self, event: str, data: dict[str, Any], step: int) -> None:
        """Record one event ("step", "epoch", "quantizers", "init", ...) at optimiser step `step`.

        Args:
            event: the event name (W&B formats "quantizers" specially, see wandb_run.py).
            data: JSON-able values (tensors and numpy numbers are converted).
            step: the global optimiser step.
        """
        self._last_step = step
        self._jsonl.write({"event": event, "step": step, "time": time.time(), **data})
        if self._wandb and not self._wandb.log(event, data, step):
            self._wandb = None  # it failed once; stop trying rather than warn every step

    def finish(self, summary: dict[str, Any]) -> None:
        """Record the final summary, close W&B (printing `wandb sync` if offline) and the file."""
        self._jsonl.write({"event": "summary", "step": self._last_step, "time": time.time(), **summary})
        if self._wandb:
            self._wandb.finish(summary)
            self._wandb = None
        self._jsonl.close()
        detach(self._log_file)
        self._log_file = None


def history_to_replay(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of an earlier attempt of this run that a resumed run continues from: those up to
    its last checkpoint (the last "epoch" event and the "quantizers" event at the same step), with
    the events of killed attempts after their last checkpoint dropped (a later attempt re-ran
    those steps: its events replace them), and without "summary" events.

    Args:
        records: metrics.jsonl's events, in file order.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        if record.get("event") == "summary":
            continue
        # A resume went back: the killed attempt's events from that point on were lost work.
        while kept and (kept[-1]["step"] > record["step"] or (
                kept[-1]["step"] == record["step"] and kept[-1]["event"] == record["event"])):
            kept.pop()
        kept.append(record)
    last = max((i for i, r in enumerate(kept) if r["event"] == "epoch"), default=-1)
    end = last + 1
    while end < len(kept) and kept[end]["event"] == "quantizers" and kept[end]["step"] == kept[last]["step"]:
        end += 1
    return kept[:end]


class NullLogger(RunLogger):
    """What ranks other than 0 get: every call does nothing."""

    def __init__(self) -> None:  # noqa: D107 - deliberately opens nothing
        self._wandb = None

    def log(self, event: str, data: dict[str, Any], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


def build_logger(
    cfg: Mapping[str, Any] | DictConfig | None,
    run_dir: Path,
    run_config: dict[str, Any],
    meta: dict[str, Any],
    rank: int = 0,
    resume_id: str | None = None,
) -> RunLogger:
    """The run's logger: JSONL always, W&B as `cfg.wandb` says; a no-op logger on ranks > 0.

    Args:
        cfg: the `logger` config group ({wandb: {mode, project, entity, dir}}).
        run_dir: the run directory (holds metrics.jsonl, and W&B's files unless wandb.dir is set).
        run_config: the resolved run config (becomes the W&B config).
        meta: experiment (W&B group), table, model, method, bits, seed (W&B tags "key:value"),
            optional name (W&B run name; default "<model>-<method>-<bits>-<seed>").
        rank: the process rank under DDP.
        resume_id: the W&B id saved in the checkpoint being resumed.
    """
    if rank != 0:
        return NullLogger()
    wandb_run = WandbRun.start(_plain(cfg).get("wandb"), Path(run_dir), run_config, meta, resume_id)
    # An offline run that resumes gets a new offline folder: it first re-logs the history so far,
    # so the newest folder alone holds the whole run (one `wandb sync`). An online resume continues
    # the run on the server and needs no replay.
    replay = wandb_run is not None and (wandb_run.mode == "offline" or resume_id is None)
    return RunLogger(run_dir, wandb_run, replay=replay)
