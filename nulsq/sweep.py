"""A Hydra multirun that survives a failing job, and says at the end how many failed.

Inside a multirun, `run_job` turns a job's exception (a NaN loss, a step size <= 0, a bad path)
into a logged line and a run directory whose summary.json says `status: failed` and why; the
job then returns normally, so Hydra launches the next one (Hydra's own launcher would run the rest
but then re-raise the first error as a traceback and skip every callback). `SweepReport`, a Hydra
callback configured in configs/config.yaml, reads each job's summary.json when the sweep ends and
prints the closing line; train.py then exits with `exit_status()`: 0, or 1 when a job failed.

Outside a multirun a failure keeps its usual form: one `error: ...` line and exit status 2.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from nulsq.cli import report_user_errors
from nulsq.errors import UserError
from nulsq.log.console import to_log_files
from nulsq.train.checkpoint import atomic_write_json

log = logging.getLogger(__name__)
SUMMARY_FILE = "summary.json"


@dataclass
class SweepOutcome:
    """What the last multirun of this process left: its folder and each job's status."""

    sweep_dir: Path
    statuses: dict[str, str] = field(default_factory=dict)  # job folder name -> status
    errors: dict[str, str] = field(default_factory=dict)  # job folder name -> the error line

    @property
    def failed(self) -> list[str]:
        return [job for job, status in self.statuses.items() if status != "finished"
                and status != "stopped"]


_LAST: SweepOutcome | None = None


def _hydra_mode_and_dir() -> tuple[bool, Path | None]:
    """(inside a Hydra multirun?, this job's Hydra output folder), (False, None) without Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return False, None
    return hc.mode == RunMode.MULTIRUN, Path(hc.runtime.output_dir)


def _error_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def record_failure(folder: Path, err: BaseException) -> None:
    """Write `<folder>/summary.json` with status "failed" and the error, unless the trainer already
    wrote one (it does for failures after the run directory exists, with the run's identity)."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        atomic_write_json(path, {"status": "failed", "error": _error_line(err)})


def run_job(fn: Callable[[], dict]) -> dict:
    """Run one Hydra job. In a multirun, a failure is logged and recorded in the job's folder and
    an empty summary is returned so the sweep goes on; otherwise UserErrors end the program with
    one line and status 2 (`report_user_errors`).

    Args:
        fn: the job's work (train.py: `lambda: run(cfg)`), returning the run summary.
    """
    multirun, job_dir = _hydra_mode_and_dir()
    if not multirun:
        return report_user_errors(lambda: _errors_to_log_files(fn))
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - one job's failure must not end the sweep
        if isinstance(err, UserError):
            log.error("job failed: %s", err)
        else:  # a bug, not a setting: keep its traceback in the log
            log.exception("job failed: %s", _error_line(err))
        if job_dir is not None:
            record_failure(job_dir, err)
        return {}


def _errors_to_log_files(fn: Callable[[], dict]) -> dict:
    """`fn()`; a UserError is also written to train.log (the console gets it from the caller)."""
    try:
        return fn()
    except UserError as err:
        to_log_files(logging.ERROR, f"error: {err}", __name__)
        raise


def read_outcome(sweep_dir: Path, since: float = 0.0) -> SweepOutcome:
    """Each job folder's status under `sweep_dir` (a folder with Hydra's `.hydra/` is a job).

    Args:
        sweep_dir: the multirun's folder (hydra.sweep.dir).
        since: ignore job folders whose Hydra config is older (an earlier sweep into the same
            folder), as a time.time() value.
    """
    outcome = SweepOutcome(Path(sweep_dir))
    for hydra_dir in sorted(Path(sweep_dir).glob("**/.hydra"), key=lambda p: _job_order(p.parent, sweep_dir)):
        try:
            if (hydra_dir / "config.yaml").stat().st_mtime < since:
                continue
        except OSError:
            pass
        job = str(hydra_dir.parent.relative_to(sweep_dir))
        try:
            summary = json.loads((hydra_dir.parent / SUMMARY_FILE).read_text())
        except (OSError, ValueError):
            outcome.statuses[job] = "no summary.json"
            continue
        outcome.statuses[job] = str(summary.get("status"))
        if summary.get("error"):
            outcome.errors[job] = str(summary["error"])
    return outcome


def _job_order(job_dir: Path, sweep_dir: Path) -> tuple:
    """Job folders in numeric order (2 before 10)."""
    parts = job_dir.relative_to(sweep_dir).parts
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


def closing_line(outcome: SweepOutcome) -> str:
    """One line: how many jobs ran and which failed, with the first failure's reason."""
    total, failed = len(outcome.statuses), outcome.failed
    if not failed:
        return f"sweep {outcome.sweep_dir}: all {total} jobs finished"
    first = failed[0]
    why = outcome.errors.get(first, outcome.statuses[first])
    return (f"sweep {outcome.sweep_dir}: {len(failed)} of {total} jobs failed (job "
            f"{', '.join(failed)}; job {first}: {why}); each job's summary.json says why")


def exit_status() -> int:
    """train.py's exit status after Hydra returns: 1 if the last multirun had a failed job."""
    return 1 if _LAST is not None and _LAST.failed else 0


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra is a dependency; keeps the module importable
    Callback = object  # type: ignore[misc,assignment]


class SweepReport(Callback):  # type: ignore[misc]
    """Hydra callback: at the end of a multirun, print the closing line (stderr with "error: " when
    a job failed) and keep the outcome for `exit_status`. Configured in configs/config.yaml
    (hydra.callbacks.sweep_report). Printed, not logged: the logging set-up is still the last
    job's, whose train.log must not receive the sweep's line."""

    _started: float = 0.0

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        self._started = time.time() - 2.0  # file times may be coarser than the clock

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        global _LAST
        _LAST = read_outcome(Path(str(config.hydra.sweep.dir)), since=self._started)
        if _LAST.failed:
            print(f"error: {closing_line(_LAST)}", file=sys.stderr, flush=True)
        else:
            print(closing_line(_LAST), flush=True)
