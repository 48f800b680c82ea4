"""The optional Weights & Biases mirror of a run's metrics.

`wandb` is imported only when a run actually starts (never with mode "disabled"), and any W&B
failure turns the mirror off with a warning: metrics.jsonl stays the record, training goes on.

Which mode (`resolve_mode`), first rule that applies:
1. `logger.wandb.mode` when set (online | offline | disabled);
2. else the `WANDB_MODE` environment variable (W&B's own; "dryrun" means offline, "run" online);
3. else online if an API key is configured (WANDB_API_KEY or ~/.netrc) AND the W&B host answers
   within a few seconds, offline otherwise. A stored key on a compute node without internet thus
   logs offline, with a warning, instead of hanging in W&B's retries.
"online" without an API key falls back to offline with a warning. An explicit "online" (config or
environment) skips the reachability check, for nodes that reach W&B through a proxy.

The run shows: "<stage>/..." epoch curves against "epoch"; step curves (loss, images/s, lrs);
per quantizer and epoch one histogram of its step sizes and one of its levels (not one curve per
level: a 4-bit MobileNetV2 would have thousands); a table of every step size at initialisation;
the console (W&B's capture of stdout, where the logging module writes); run-level summary values
(final and best top-1, mean images/s) that no step's value overwrites; the job type "search" for
runs scored on a held-out split (dataset.val_split > 0), else "final".
"""

from __future__ import annotations

import dataclasses
import logging
import netrc
import os
import socket
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

from nulsq.config import WandbConfig
from nulsq.errors import UserError
from nulsq.registry import Registry

log = logging.getLogger(__name__)

MODES = ("online", "offline", "disabled")
ENV_ALIASES = {"dryrun": "offline", "run": "online"}  # W&B's older names for WANDB_MODE values
# The schema (nulsq/config.py) is the one place the defaults live.
DEFAULTS: dict[str, Any] = dataclasses.asdict(WandbConfig())
WANDB_KEYS = tuple(DEFAULTS)
PROBE_TIMEOUT_S = 3.0
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


def _api_host() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def host_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True if a TCP connection to the W&B API host opens within `timeout` seconds."""
    try:
        with socket.create_connection(_api_host(), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_mode(mode: str | None) -> str:
    """The mode to run W&B in (the rules in the module docstring).

    Args:
        mode: `logger.wandb.mode`: online | offline | disabled | None (then WANDB_MODE, then auto).
    """
    if mode is not None and mode not in MODES:
        raise UserError(f"unknown logger.wandb.mode '{mode}'; valid: {', '.join(MODES)}, null (auto)")
    if mode is None and os.environ.get("WANDB_MODE"):
        env = os.environ["WANDB_MODE"].strip().lower()
        mode = ENV_ALIASES.get(env, env)
        if mode not in MODES:
            raise UserError(f"unknown WANDB_MODE '{env}'; valid: {', '.join(MODES)} (or unset it)")
    if mode is None:
        if not has_api_key():
            return "offline"
        if not host_reachable():
            host = _api_host()[0]
            log.warning("W&B: an API key is configured but %s cannot be reached from this node; "
                        "logging offline (set logger.wandb.mode=online or WANDB_MODE=online to skip "
                        "this check)", host)
            return "offline"
        return "online"
    if mode == "online" and not has_api_key():
        log.warning("W&B: no API key (WANDB_API_KEY or ~/.netrc); logging offline instead")
        return "offline"
    return mode


def job_type(run_config: dict[str, Any]) -> str:
    """"search" for a run scored on a held-out split of the training set, else "final"."""
    val_split = (run_config.get("dataset") or {}).get("val_split") or 0
    return "search" if float(val_split) > 0 else "final"


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
    """Per quantizer, one histogram of its step sizes and one of its levels (other keys, such as
    the epoch the trainer adds, are already in the epoch event's row). The exact values of every
    epoch are in metrics.jsonl (scripts/plot_levels.py draws them)."""
    out: dict[str, Any] = {}
    for layer, q in data.get("layers", {}).items():
        if q.get("steps"):
            out[f"quantizers/{layer}/steps"] = wandb.Histogram(q["steps"])
        if q.get("levels"):
            out[f"quantizers/{layer}/levels"] = wandb.Histogram(q["levels"])
    return out


def _steps_table(data: dict[str, Any], wandb: Any) -> Any:
    table = wandb.Table(columns=["layer", "kind", "role", "bits", "index", "step"])
    for layer, q in data.get("layers", {}).items():
        for i, step in enumerate(q.get("steps") or []):
            table.add_data(layer, q["kind"], q["role"], q["bits"], i, step)
    return table


@EVENT_PAYLOADS.register("init")
def _init_payload(data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    """The initialisation note under init/, the initial histograms, and one table of every
    initial step size (once per run, not per epoch)."""
    note = flatten({k: v for k, v in data.items() if k != "layers"}, "init/")
    if "layers" not in data:
        return note
    return {**note, **_quantizer_payload(data, wandb), "init/steps_table": _steps_table(data, wandb)}


def _payload(event: str, data: dict[str, Any], wandb: Any) -> dict[str, Any]:
    if event in EVENT_PAYLOADS:
        return EVENT_PAYLOADS.get(event)(data, wandb)
    return flatten(data, f"{event}/")  # an event without its own format: its scalars, prefixed


# Events whose metrics W&B plots against another logged key instead of the optimiser step.
EVENT_AXES = {"epoch": "epoch"}


# -- the run -----------------------------------------------------------------------------------------
def _identity(meta: dict[str, Any], run_config: dict[str, Any]) -> dict[str, Any]:
    """W&B name, group, tags and job type from the run's meta (experiment, table, model, method,
    bits, seed) and config (the job type)."""
    tags = [f"{k}:{meta[k]}" for k in TAG_KEYS if meta.get(k) is not None]
    parts = [str(meta[k]) for k in ("model", "method", "bits", "seed") if meta.get(k) is not None]
    name = meta.get("name") or "-".join(parts) or None
    return {"name": name, "group": meta.get("experiment"), "tags": tags,
            "job_type": job_type(run_config)}


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
                # "wrap": W&B keeps what reaches stdout/stderr, i.e. the logging module's lines
                settings=wandb.Settings(silent=True, console="wrap"),
                **_identity(meta, run_config),
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
        """Write the summary, close the run, and for offline runs say how to upload it."""
        try:
            if self._last_step >= 0:
                # Commit the last history row first: committed later (by finish), its values
                # would replace the run-level ones (images_per_s of the last step, not the mean).
                self.run.log({}, step=self._last_step, commit=True)
            self.run.summary.update(flatten(summary))
            sync_dir = Path(self.run.dir).parent  # <dir>/wandb/offline-run-*/files -> the run
            self.run.finish()
        except Exception as err:  # noqa: BLE001
            log.warning("W&B finish failed (%s); metrics.jsonl is complete", _one_line(err))
            return
        if self.mode == "offline":
            log.info("W&B offline run saved (the whole history, resumes included); upload it with: "
                     "wandb sync %s", sync_dir)


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"
