"""Module and state-dict names without the prefixes that wrappers add.

DDP adds "module.", torch.compile "_orig_mod."; dropping them keeps layer names and checkpoint
keys identical between single-device, DDP and compiled runs.
"""

from __future__ import annotations

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(name: str) -> str:
    """`name` with every leading wrapper prefix removed (they can nest: module._orig_mod.x)."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return name
