"""The run's permanent record: `metrics.jsonl`, one JSON object per logged event.

The writer keeps the file open and line-buffered, so every event is on disk as soon as it is
logged and a killed run loses at most the line being written. Readers tolerate that torn last line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nulsq.errors import UserError


def _to_json(value: Any) -> Any:
    """`json.dumps` fallback: tensors and numpy scalars/arrays become Python numbers and lists."""
    if hasattr(value, "tolist"):  # torch.Tensor, numpy array or scalar
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to metrics.jsonl")


def _drop_torn_tail(path: Path) -> None:
    """Cut a partial last line left by a killed run, so appended events start on a fresh line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)  # rfind -1 -> truncate to 0: the only line was torn


class JsonlWriter:
    """Appends one JSON object per line to `path` (appending, so a resumed run continues the file).

    Args:
        path: the metrics file; parent directories are created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.path)
        # buffering=1: line-buffered text file, i.e. flushed at every newline.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # One write call per record: a kill can tear only the last line, never interleave two.
        self._file.write(json.dumps(record, default=_to_json) + "\n")

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def read_metrics(path: Path | str) -> list[dict[str, Any]]:
    """All events of a `metrics.jsonl`, in order; a torn (unparsable) final line is skipped.

    Args:
        path: the metrics file.

    Raises:
        UserError: the file is missing, or a line other than the last is not valid JSON.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no metrics file at {path}; pass a run directory written by train.py")
    lines = path.read_text(encoding="utf-8").splitlines()
    records: list[dict[str, Any]] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):  # the run was killed mid-write: that event never finished
                break
            raise UserError(f"{path}:{number} is not valid JSON; fix or delete that line") from None
    return records

