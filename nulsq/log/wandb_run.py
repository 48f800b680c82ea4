"""The optional Weights & Biases mirror of a run's metrics.

`wandb` is imported only when a run actually starts (never with mode "disabled"), and any W&B
failure turns the mirror off with a warning: metrics.jsonl stays the record, training goes on.
"""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from nulsq.errors import UserError
from nulsq.registry import Registry

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
WANDB_KEYS = ("mode", "project", "entity", "dir")
DEFAULTS: dict[str, Any] = {"mode": None, "project": "nulsq", "entity": None, "dir": None}
# The meta keys that become "key:value" tags; "experiment" becomes the group.
TAG_KEYS = ("table", "model", "method", "bits", "seed")

Payload = Callable[[dict[str, Any], Any], dict[str, Any]]
# event name -> function(data, wandb module) -> the dict given to wandb.log.
EVENT_PAYLOADS: Registry[Payload] = Registry("W&B event")


# -- which mode ------------------------------------------------------------------------------------
def has_api_key() -> bool:
    """True if WANDB_API_KEY is set or ~/.netrc (or $NETRC) holds a login for the W&B API host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        entry = netrc.netrc(path).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def resolve_mode(mode: str | None) -> str:
    """The mode to run W&B in: null = online if a key is configured else offline; online without a
    key falls back to offline with a warning.

    Args:
        mode: `logger.wandb.mode`: online | offline | disabled | None.
    """
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown logger.wandb.mode '{mode}'; valid: {', '.join(MODES)}, null (auto)")
    if mode is None:
        return "online" if has_api_key() else "offline"
    if mode == "online" and not has_api_key():
        log.warning("W&B: no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
        return "offline"
    return mode


def wandb_settings(cfg: dict[str, Any] | None) -> dict[str, Any]:
    """`logger.wandb` with defaults filled in; a mistyped key is an error, not a silent default.

    Args:
        cfg: the `logger.wandb` mapping (may be None or partial).
    """
    cfg = dict(cfg or {})
    unknown = sorted(set(cfg) - set(WANDB_KEYS))
    if unknown:
        raise UserError(
            f"unknown key(s) logger.wandb.{', '.join(unknown)}; valid: {', '.join(WANDB_KEYS)}"
        )
    return {**DEFAULTS, **cfg}


# -- what each event becomes in W&B ------------------------------------------------------------------
def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> "a/b" keys; numbers, bools and strings kept, lists and None dropped."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}/"))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
    return out


@EVENT_PAYLOADS.register("step")
def _step_payload(data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    return flatten(data)


@EVENT_PAYLOADS.register("epoch")
def _epoch_payload(data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """Metrics as "<stage>/<name>" (e.g. qat/val/top1): epochs restart at 1 in each stage, so one
    curve per stage keeps the epoch axis monotonic. "epoch" stays unprefixed: it is the axis."""
    stage = data.get("stage")
    prefix = f"{stage}/" if stage else ""
    rest = {k: v for k, v in data.items() if k not in ("epoch", "stage")}
    return {**flatten(rest, prefix), "epoch": data["epoch"]}


@EVENT_PAYLOADS.register("quantizers")
def _quantizer_payload(data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """A table of per-layer step sizes, histograms of steps and levels, and one scalar per level
    (other keys, such as the epoch the trainer adds, are already in the epoch event's row)."""
    table = wandb.Table(columns=["layer", "kind", "role", "bits", "index", "step"])
    out: dict[str, Any] = {}
    for layer, q in data.get("layers", {}).items():
        for i, step in enumerate(q.get("steps") or []):
            table.add_data(layer, q["kind"], q["role"], q["bits"], i, step)
        if q.get("steps"):
            out[f"quantizers/{layer}/steps"] = wandb.Histogram(q["steps"])
        if q.get("levels"):
            out[f"quantizers/{layer}/levels"] = wandb.Histogram(q["levels"])
        # One scalar per level, named by index: nuLSQ and LSQ runs of one layer overlay.
        for i, level in enumerate(q.get("levels") or []):
            out[f"levels/{layer}/{i}"] = level
    out["quantizers/steps_table"] = table
    return out


@EVENT_PAYLOADS.register("init")
def _init_payload(data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """The initialisation note under init/, and the initial levels as the first point of each
    level curve."""
    note = flatten({k: v for k, v in data.items() if k != "layers"}, "init/")
    return {**note, **(_quantizer_payload(data, wandb) if "layers" in data else {})}


def _payload(event: str, data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    if event in EVENT_PAYLOADS:
        return EVENT_PAYLOADS.get(event)(data, wandb)
    return flatten(data, f"{event}/")  # an event without its own format: its scalars, prefixed


# Events whose metrics W&B plots against another logged key instead of the optimiser step.
EVENT_AXES = {"epoch": "epoch"}


# -- the run -----------------------------------------------------------------------------------------
def _identity(meta: dict[str, Any]) -> dict[str, Any]:
    """W&B name, group and tags from the run's meta (experiment, table, model, method, bits, seed)."""
    tags = [f"{k}:{meta[k]}" for k in TAG_KEYS if meta.get(k) is not None]
    parts = [str(meta[k]) for k in ("model", "method", "bits", "seed") if meta.get(k) is not None]
    name = meta.get("name") or "-".join(parts) or None
    return {"name": name, "group": meta.get("experiment"), "tags": tags}


class WandbRun:
    """A started W&B run; every call is guarded so W&B trouble never stops training.

    Args:
        run: the object `wandb.init` returned.
        wandb: the imported wandb module (kept so nothing re-imports it).
        mode: "online" or "offline".
    """

    def __init__(self, run: Any, wandb: Any, mode: str) -> None:
        self.run = run
        self.wandb = wandb
        self.mode = mode
        self.id: str = run.id
        self._on_axis: set[str] = set()  # keys already tied to their x-axis by define_metric
        self._last_step = -1
        self._warned_step = False

    @classmethod
    def start(
        cls,
        cfg: dict[str, Any] | None,
        run_dir: Path,
        run_config: dict[str, Any],
        meta: dict[str, Any],
        resume_id: str | None = None,
    ) -> "WandbRun | None":
        """Start W&B as `logger.wandb` says; None when disabled or when W&B fails to start.

        Args:
            cfg: the `logger.wandb` mapping (mode, project, entity, dir).
            run_dir: the run directory (W&B's directory unless `dir` is set).
            run_config: the resolved run config, shown as the W&B config.
            meta: experiment, table, model, method, bits, seed (name, group and tags).
            resume_id: a W&B run id from a checkpoint: continue that run.
        """
        settings = wandb_settings(cfg)
        mode = resolve_mode(settings["mode"])
        if mode == "disabled":
            return None
        wandb_dir = Path(settings["dir"] or run_dir)
        try:
            wandb_dir.mkdir(parents=True, exist_ok=True)
            import wandb  # here, not at module top: mode "disabled" must not import it

            run = wandb.init(
                mode=mode,
                project=settings["project"],
                entity=settings["entity"],
                dir=str(wandb_dir),
                config=run_config,
                id=resume_id,
                resume="allow" if resume_id else None,
                settings=wandb.Settings(silent=True, console="off"),
                **_identity(meta),
            )
            for axis in set(EVENT_AXES.values()):
                run.define_metric(axis)
        except Exception as err:  # noqa: BLE001 - any W&B failure must leave training running
            log.warning("W&B failed to start (%s); logging to metrics.jsonl only", _one_line(err))
            return None
        return cls(run, wandb, mode)

    def log(self, event: str, data: dict[str, Any], step: int) -> bool:
        """Send one event; False (after a warning) if W&B failed and should be dropped."""
        if step < self._last_step:
            # W&B rows only move forward; the event stays in metrics.jsonl.
            if not self._warned_step:
                log.warning("W&B: '%s' event at step %d after step %d is kept in metrics.jsonl "
                            "only (W&B steps must not decrease)", event, step, self._last_step)
                self._warned_step = True
            return True
        try:
            payload = _payload(event, data, self.wandb)
            axis = EVENT_AXES.get(event)
            # Exact names, defined on first sight, so no glob has to guess the stage prefixes.
            if axis:
                for key in sorted(payload.keys() - self._on_axis - {axis}):
                    self.run.define_metric(key, step_metric=axis)
                    self._on_axis.add(key)
            self.run.log(payload, step=step)
        except Exception as err:  # noqa: BLE001
            log.warning("W&B log failed (%s); logging to metrics.jsonl only", _one_line(err))
            return False
        self._last_step = step
        return True

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the summary, close the run, and for offline runs print how to upload it."""
        try:
            self.run.summary.update(flatten(summary))
            sync_dir = Path(self.run.dir).parent  # <dir>/wandb/offline-run-*/files -> the run
            self.run.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B finish failed (%s); metrics.jsonl is complete", _one_line(err))
            return
        if self.mode == "offline":
            print(f"W&B offline run saved; upload it with: wandb sync {sync_dir}", flush=True)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
