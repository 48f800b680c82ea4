"""Reading a torch file a user points at without ever running code from it.

`torch.save` files are pickles, and unpickling a crafted pickle calls whatever function it names
(`os.system`, `builtins.exec`, ...). `torch.load(weights_only=True)` only rebuilds tensors and plain
containers (dict, list, tuple, str, numbers, bool, None) and refuses any other name before calling
it, so every file a user can point at is read through `load_torch_file`: checkpoints (resume,
eval.py), the (b+1)-bit run a progressive start merges from, and pretrained weights. Plain
pickles of numpy arrays (the CIFAR python release) go through `load_numpy_pickle`, whose unpickler
knows numpy's array constructors and nothing else.

Checkpoints written by nulsq before its RNG states were stored as plain lists hold numpy's RNG keys
as a pickled numpy array. Those load only with `trust=True` (`trainer.trust_checkpoint=true`,
`eval.py --trust-checkpoint`), which also allows numpy's array reconstruction, and still nothing
that runs code: a file naming any other function is refused with or without trust.
"""

from __future__ import annotations

import codecs
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nulsq.errors import UserError

# The names an old nulsq checkpoint's pickle uses for its numpy RNG keys (numpy 1.x and 2.x).
NUMPY_ARRAY_NAMES = frozenset({"numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                               "numpy.ndarray", "numpy.dtype"})
# Where torch's refusal names the offending global in files its scanner cannot read.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# The one-line reason inside torch's refusal of anything else.
_WHY = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")
# How many refused names a message shows.
_SHOWN = 3


def _numpy_array_globals() -> list:
    """What a weights-only load must also allow to rebuild a uint32 numpy array."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    reconstruct = multiarray._reconstruct
    return [(reconstruct, name) for name in NUMPY_ARRAY_NAMES if name.endswith("_reconstruct")] + [
        np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def refused_globals(path: Path, err: Exception) -> list[str]:
    """The callables a pickle names beyond tensors and plain containers (read, never called)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # noqa: BLE001  (not a zip checkpoint: torch's error names the first one)
        return _REFUSED_GLOBAL.findall(str(err))


def load_torch_file(path: str | Path, what: str, fix: str, trust: bool = False,
                    trust_hint: str = "trainer.trust_checkpoint=true") -> Any:
    """`torch.load(path, weights_only=True)` on the CPU; every failure is one UserError line.

    Args:
        path: the file.
        what: how messages name it ("checkpoint", "init.from_run checkpoint").
        fix: what to do about a corrupt file, as the end of the message.
        trust: also allow numpy arrays (checkpoints of nulsq before its tensors-only format).
        trust_hint: how the user asks for `trust` (named in the old-format message).

    Raises:
        UserError: the file is missing or corrupt, names code to run (never run: refused), or is
            an old-format checkpoint and `trust` is off.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = refused_globals(path, err)
        if not names:  # refused for another reason (an opcode, a type): not a file torch.save wrote
            reason = (_WHY.findall(str(err)) or ["UnpicklingError"])[0]
            raise UserError(f"{what} {path} is corrupt or not a torch file ({reason}); {fix}") from None
    except Exception as err:  # noqa: BLE001  (a torn zip, a text file, ...: all mean a bad file)
        raise UserError(
            f"{what} {path} is corrupt or not a torch file ({type(err).__name__}); {fix}") from None
    others = [n for n in names if n not in NUMPY_ARRAY_NAMES]
    if others:
        shown = ", ".join(others[:_SHOWN]) + (" ..." if len(others) > _SHOWN else "")
        raise UserError(
            f"refusing to load {what} {path}: unpickling it would call {shown}, which no nulsq file "
            f"needs (tensors and plain values only); it was not written by nulsq or was altered, "
            f"so do not load it: delete it"
        )
    if not trust:
        raise UserError(
            f"{what} {path} was written by an older nulsq (its numpy RNG state is a pickled numpy "
            f"array, which a safe load refuses); if it is yours or you trust its source, add "
            f"{trust_hint} to read it (numpy arrays allowed, still no code), and checkpoints "
            f"written after that are in the safe format"
        )
    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(
            f"{what} {path} cannot be read even with numpy arrays allowed ({type(err).__name__}); {fix}"
        ) from None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, limited to latin-1 (other codecs
    compress, or decode what they are given)."""
    if codecs.lookup(encoding).name != "iso8859-1":
        raise pickle.UnpicklingError(f"refused codec {encoding!r} in _codecs.encode")
    return codecs.encode(text, "latin1")


def _numpy_pickle_names() -> dict[str, Any]:
    """What a pickle of numpy arrays and plain containers may name, numpy 1.x and 2.x spellings."""
    core = np._core if hasattr(np, "_core") else np.core
    names: dict[str, Any] = {"numpy.ndarray": np.ndarray, "numpy.dtype": np.dtype,
                             "_codecs.encode": _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        names[f"{package}.multiarray._reconstruct"] = core.multiarray._reconstruct
        names[f"{package}.numeric._frombuffer"] = core.numeric._frombuffer
    return names


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dicts, lists, strings and numbers, and refuses
    every other global before it is called (Python's "restricting globals" recipe)."""

    def find_class(self, module: str, name: str) -> Any:
        found = _numpy_pickle_names().get(f"{module}.{name}")
        if found is None:
            raise _Refused(f"{module}.{name}")
        return found


class _Refused(pickle.UnpicklingError):
    """A pickle named a global outside the allowlist (its name is the message)."""


def load_numpy_pickle(path: str | Path, what: str, encoding: str = "latin1") -> Any:
    """Unpickle `path` allowing only numpy arrays and plain containers (never code).

    Args:
        path: the pickle file.
        what: how the message names it ("CIFAR-10 file").
        encoding: how Python 2 strings are decoded (latin1, as torchvision reads CIFAR).

    Raises:
        UserError: the pickle names anything else (it is refused before anything is called).
        pickle.UnpicklingError, EOFError, ValueError: a file that is not such a pickle.
    """
    with open(path, "rb") as f:
        try:
            return _NumpyOnlyUnpickler(f, encoding=encoding).load()
        except _Refused as refused:
            raise UserError(
                f"refusing to read {what} {path}: unpickling it would call {refused}, which a file "
                f"of numpy arrays never needs; it was not written as one or was altered: delete it"
            ) from None
