"""What train.py does around `nulsq.train.run`: user mistakes become one line and exit status 2."""

from __future__ import annotations

import os
import sys
from typing import Callable

from nulsq.errors import UserError


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
