"""The one exception type for mistakes in the user's input.

`train.py` prints a UserError as a single line (no traceback unless HYDRA_FULL_ERROR=1) and exits
with status 2, so every message must say what was wrong and what to do about it.
"""


class UserError(Exception):
    """A bad config value, a missing file, an unknown name: the user can fix it."""
