"""Console lines through the logging module: one logger per module (`logging.getLogger(__name__)`),
all under the "nulsq" logger, so every line reaches the console, `<run dir>/train.log` and, through
W&B's console capture, the W&B run.

Under train.py, Hydra configures logging (configs/hydra/job_logging/nulsq.yaml: bare lines on the
console, time and level in train.log). `attach_run_log` fills the gaps: a train.log in the run
directory when Hydra's file is elsewhere (trainer.output_dir, a resumed sibling run) or absent
(`nulsq.train.run` called from Python), and a console handler when nothing configured logging.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

RUN_LOG = "train.log"
FILE_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
PACKAGE = "nulsq"


class CurrentStdout(logging.StreamHandler):
    """A StreamHandler writing to whatever `sys.stdout` is when a line is emitted: W&B's console
    capture (and pytest's) replace sys.stdout after this handler exists, and a handler holding the
    old stream would write past them."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: ANN201  (a text stream)
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it: follow sys
        pass


def _reached_handlers() -> list[logging.Handler]:
    """The handlers a record of a "nulsq.*" logger reaches (the package's, then its ancestors')."""
    found: list[logging.Handler] = []
    node: logging.Logger | None = logging.getLogger(PACKAGE)
    while node is not None:
        found += node.handlers
        if not node.propagate:
            break
        node = node.parent  # type: ignore[assignment]
    return found


def log_files() -> list[logging.FileHandler]:
    """The files "nulsq.*" records are written to."""
    return [h for h in _reached_handlers() if isinstance(h, logging.FileHandler)]


def attach_run_log(run_dir: Path) -> logging.Handler | None:
    """Make INFO lines of "nulsq.*" reach the console and `<run_dir>/train.log`.

    Returns:
        the file handler added for train.log (give it to `detach`), or None when one already
        writes that file (Hydra's).
    """
    package = logging.getLogger(PACKAGE)
    if package.getEffectiveLevel() > logging.INFO:
        package.setLevel(logging.INFO)
    if not _reached_handlers():  # plain Python, nothing configured: lines to stdout, as print did
        console = CurrentStdout()
        console.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(console)
    path = (Path(run_dir) / RUN_LOG).resolve()
    if any(Path(h.baseFilename) == path for h in log_files()):
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    package.addHandler(handler)
    return handler


def detach(handler: logging.Handler | None) -> None:
    """Remove and close a handler `attach_run_log` added."""
    if handler is not None:
        logging.getLogger(PACKAGE).removeHandler(handler)
        handler.close()


def to_log_files(level: int, message: str, name: str = PACKAGE) -> None:
    """Write one line to the log files only (the console has it already in another form)."""
    record = logging.getLogger(name).makeRecord(name, level, "", 0, message, None, None)
    for handler in log_files():
        if record.levelno >= handler.level:
            handler.handle(record)
