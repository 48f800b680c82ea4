"""What train.py does around Hydra and `nulsq.train.run`.

- User mistakes become one line on stderr and exit status 2 (`report_user_errors`), including an
  unknown config group option, which Hydra itself reports over a dozen lines
  (`check_group_choices`, run on the command line before Hydra composes).
- Before Hydra makes its run directory, `preflight_command_line` composes the config as Hydra is
  about to (`compose`: a refused key or value is one line) and runs the trainer's preflight on it,
  with Hydra's run directory among the folders checked: a mistake leaves no folder behind.
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


def compose(overrides: Sequence[str], config_dir: Path, with_hydra: bool = False):
    """The config `python train.py <overrides>` composes (with Hydra's own node if asked); a key
    or value the schema refuses, or an override Hydra cannot parse, is a one-line UserError.

    Args:
        overrides: command-line overrides (no flags such as -m or --cfg).
        config_dir: the primary config folder (configs/).
        with_hydra: keep the `hydra` node (run directory, sweeper) in the result.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    from nulsq.config import config_error

    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        try:
            return hydra_compose("config", overrides=list(overrides), return_hydra_config=with_hydra)
        except HydraException as err:
            user_error = config_error(err)
            if user_error is None:  # not the schema's refusal: Hydra's own first line
                user_error = UserError(str(err).strip().splitlines()[0])
            raise user_error from None


# Arguments after which the command line is not one plain run: Hydra's flags (-m, --cfg, --help,
# -cn, ...) and sweeps; each multirun job runs the preflight itself (`nulsq.train.run`).
_NOT_ONE_RUN = ("-", "hydra.mode", "hydra/sweeper", "hydra.sweeper")


def preflight_command_line(overrides: Sequence[str], config_dir: Path) -> None:
    """Check a plain `python train.py <overrides>` before Hydra creates its run directory: the
    config composes, the trainer's preflight passes, and hydra.run.dir can be made. Raises
    UserError; does nothing for multirun or Hydra's own flags."""
    if any(arg.lstrip("+~").startswith(_NOT_ONE_RUN) for arg in overrides):
        return
    from omegaconf import OmegaConf, open_dict

    from nulsq.config import validate

    try:
        cfg = compose(overrides, config_dir, with_hydra=True)  # before importing torch: fast to fail
    except UserError as err:
        if "Ambiguous value" in str(err):  # a sweep (a,b) that an hparams file makes a multirun:
            return  # Hydra runs it, and each job checks itself in run()
        raise
    if str(OmegaConf.select(cfg, "hydra.mode", default="")).endswith("MULTIRUN"):
        return  # an hparams file (hydra.mode: MULTIRUN) makes this a sweep: each job checks itself
    try:
        run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001  (a resolver only Hydra's run provides: Hydra checks it)
        run_dir = None
    with open_dict(cfg):
        del cfg["hydra"]
    cfg = validate(cfg)
    from nulsq.train.preflight import check_output_dir, preflight

    if run_dir:
        check_output_dir(Path(run_dir), "hydra.run.dir")
    output = Path(cfg.trainer.output_dir) if cfg.trainer.output_dir else None
    preflight(cfg, output, "trainer.output_dir")


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
