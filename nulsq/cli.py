"""What train.py does around Hydra and `nulsq.train.run`.

- User mistakes become one line on stderr and exit status 2 (`report_user_errors`), including an
  unknown config group option, which Hydra itself reports over a dozen lines
  (`check_group_choices`, run on the command line before Hydra composes).
- Under torchrun, ranks other than 0 must not make a Hydra run directory of their own: with the
  default `${now:...}` directory name two ranks may disagree by a second and leave a stray
  folder. `rank_overrides` sends their Hydra output to a throwaway folder; the run directory
  itself is rank 0's, broadcast by the trainer.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Callable

from nulsq.errors import UserError

# `[+|++]group[@package]=value`: a config group selection (a key with dots is a value override).
_GROUP_CHOICE = re.compile(r"^\+{0,2}(?P<group>[A-Za-z_][\w/-]*)(?:@[\w.]*)?=(?P<value>.*)$")
# Sweep functions, interpolations, lists: not plain option names, left for Hydra to judge.
_NOT_A_NAME = re.compile(r"[()\[\]{}$*]")
# What ranks > 0 must not take from the command line (replaced by rank_overrides).
_RANK0_ONLY = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.output_subdir",
               "hydra/job_logging", "hydra/hydra_logging")


def script_exit_code(fn: Callable[[], object], done: str) -> int:
    """A script's work: print `done` and return 0, or print a UserError as `error: ...` on stderr
    and return 2."""
    try:
        fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(done)
    return 0


def report_user_errors(fn: Callable[[], object]) -> object:
    """Call `fn`; print a UserError as `error: ...` on stderr and exit 2, unless HYDRA_FULL_ERROR=1
    asks for the traceback."""
    try:
        return fn()
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


def _options(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_choices(overrides: Sequence[str], config_dir: Path) -> None:
    """Raise UserError for `group=name` when configs/<group>/<name>.yaml does not exist.

    Multirun lists (`model=a,b`) are checked name by name. Hydra's own groups (hydra/...) and
    anything that is not a plain name (sweep functions, interpolations) are left to Hydra.

    Args:
        overrides: the command-line arguments after the program name.
        config_dir: the primary config folder (configs/).
    """
    for arg in overrides:
        match = _GROUP_CHOICE.match(arg)
        if match is None or arg.startswith("-"):
            continue
        group, value = match["group"], match["value"].strip().strip("'\"")
        folder = config_dir / group
        if group == "hydra" or group.startswith("hydra/") or not folder.is_dir():
            continue
        if value in ("", "null") or _NOT_A_NAME.search(value):
            continue
        for name in (v.strip() for v in value.split(",")):
            if not (folder / f"{name}.yaml").is_file():
                raise UserError(
                    f"unknown {group} '{name}' (no {folder / name}.yaml); valid {group} options: "
                    f"{', '.join(_options(folder))}"
                )


def rank_overrides(argv: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """`argv` as a torchrun rank should pass it to Hydra: unchanged on rank 0 or without torchrun;
    on other ranks, Hydra's output (run dir, .hydra/, log file) goes to a temp folder removed at
    exit, so only rank 0's Hydra run directory exists.

    Args:
        argv: sys.argv (program name first).
        env: the process environment (RANK, WORLD_SIZE as torchrun sets them).
    """
    if int(env.get("WORLD_SIZE", "1")) <= 1 or int(env.get("RANK", "0")) == 0:
        return list(argv)
    scratch = tempfile.mkdtemp(prefix=f"nulsq-rank{env['RANK']}-")
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    kept = [a for a in argv if not a.lstrip("+~").startswith(_RANK0_ONLY)]
    return kept + [f"hydra.run.dir={scratch}", f"hydra.sweep.dir={scratch}",
                   "hydra.sweep.subdir=.", "hydra.output_subdir=null",
                   "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
