"""Folders set once per machine: `paths.data_dir`, the parent of every dataset's default root.

Its value comes from the environment variable NULSQ_DATA, else `data/` (relative to where
train.py runs), and a machine's own `configs/local/default.yaml` (git-ignored) or the command
line may set it too. The built-in `data/` is created on demand (a CIFAR download makes it); a
folder set on purpose must exist, so a typo stops the run at once instead of downloading into a
new folder or reporting a missing dataset far from the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

from nulsq.errors import UserError

DATA_ENV = "NULSQ_DATA"
DEFAULT_DATA_DIR = "data"


def check_data_dir(data_dir: str, env: dict[str, str] | None = None) -> Path:
    """`data_dir` as a Path; a UserError naming where it was set when a chosen one is missing.

    Args:
        data_dir: the resolved `paths.data_dir`.
        env: the environment (os.environ by default), to say whether NULSQ_DATA set it.
    """
    env = os.environ if env is None else env
    path = Path(data_dir).expanduser()
    if data_dir == DEFAULT_DATA_DIR or path.is_dir():
        return path
    if env.get(DATA_ENV) == data_dir:
        where = f"{DATA_ENV}={data_dir}"
        fix = f"create it, or point {DATA_ENV} at the folder holding your datasets (unset: ./data)"
    else:
        where = f"paths.data_dir={data_dir}"
        fix = "create it, or fix paths.data_dir (command line or configs/local/default.yaml)"
    kind = "is not a folder" if path.exists() else "does not exist"
    raise UserError(f"{where} {kind}; {fix}")
