"""The code a run was trained with: the git commit of this checkout and whether it had local edits.

Stored in every summary.json ("code"), shown by scripts/make_tables.py beside each table cell, so a
number can be traced to the code that produced it.
"""

from __future__ import annotations

import subprocess
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True,
                              timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> dict:
    """{"commit": full sha, "dirty": tracked files differ from it}; both None outside a git checkout
    of this project (e.g. an installed wheel), never a parent repository's commit."""
    top = _git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != ROOT:
        return {"commit": None, "dirty": None}
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": _git("rev-parse", "HEAD"), "dirty": None if status is None else bool(status)}


def describe(code: dict | None) -> str:
    """"abc1234", "abc1234+dirty" or "unknown" (a run from before code versions were recorded)."""
    if not code or not code.get("commit"):
        return "unknown"
    return code["commit"][:7] + ("+dirty" if code.get("dirty") else "")
