"""Pretrained weights: read a file, load it strictly.

Nothing here touches the network: where a library's file comes from (its cache, else its own
download) is `nulsq.models.fetch`; `model.pretrained=/path` names a local file directly.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.module_names import strip_wrappers

log = logging.getLogger(__name__)

# Checkpoints written by training scripts keep the weights under one of these keys; the first
# present wins (timm's train.py writes both "state_dict" and "state_dict_ema").
NESTING_KEYS = ("state_dict", "model", "state_dict_ema")
# Wrappers that rename every key: DistributedDataParallel and torch.compile.
# How many offending keys an error message shows per kind.
SHOWN_KEYS = 3

StateDict = dict[str, torch.Tensor]


def _torch_reader(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _safetensors_reader(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


# File suffix -> reader; anything not listed is read as a torch.save file.
READERS: dict[str, Callable[[Path], Any]] = {".safetensors": _safetensors_reader}


def classifier_name(model: nn.Module) -> str | None:
    """The qualified name of the model's classifier: its last nn.Linear, or None if it has none.

    Args:
        model: a classification network whose head is its last Linear layer (true of every
            registered model: timm's `fc`/`classifier`/`head.fc`, pytorchcv's `output`).
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return names[-1] if names else None


def _unwrap(obj: Any, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in NESTING_KEYS:
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(
        isinstance(v, torch.Tensor) for v in obj.values()
    ):
        raise UserError(
            f"pretrained weights file {path} holds no state dict (expected a mapping of tensors, "
            f"bare or under one of {', '.join(NESTING_KEYS)}); point model.pretrained at a weights file"
        )
    return {strip_wrappers(str(k)): v for k, v in obj.items()}


def read_state_dict(path: str | Path) -> StateDict:
    """Read a state dict from a .pt/.pth/.bin (torch.save) or .safetensors file, on the CPU.

    Args:
        path: the file; nested checkpoints ("state_dict", "model", "state_dict_ema") are
            unwrapped and "module."/"_orig_mod." prefixes stripped.

    Raises:
        UserError: the file is missing, unreadable, or holds no mapping of tensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(
            f"pretrained weights file not found: {path}; fix model.pretrained "
            f"(a path, true for the library's cache, or false for random init)"
        )
    reader = READERS.get(path.suffix.lower(), _torch_reader)
    try:
        obj = reader(path)
    except Exception as err:  # any failure to parse means the same thing to the user
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot read pretrained weights file {path} ({type(err).__name__}: {reason}); "
            f"it must be a torch.save state dict or a .safetensors file"
        ) from err
    return _unwrap(obj, path)


def _is_head_resize(key: str, head: str | None, got: torch.Size, want: torch.Size) -> bool:
    """True when `key` is a classifier tensor differing only in its number of classes (dim 0)."""
    return (
        head is not None
        and key.startswith(head + ".")
        and len(got) == len(want) >= 1
        and got[1:] == want[1:]
    )


def _mismatch_error(path: Path, label: str, problems: dict[str, list[str]]) -> UserError:
    total = sum(len(keys) for keys in problems.values())
    shown = "; ".join(
        f"{kind} {', '.join(keys[:SHOWN_KEYS])}" + (" ..." if len(keys) > SHOWN_KEYS else "")
        for kind, keys in problems.items()
        if keys
    )
    return UserError(
        f"pretrained weights file {path} does not match architecture {label} "
        f"({total} mismatched keys: {shown}); point model.pretrained at weights for that model"
    )


def load_pretrained(model: nn.Module, path: str | Path, label: str) -> None:
    """Load a weights file into `model` strictly, except a classifier sized for other classes.

    Args:
        model: the freshly built network (its classifier already sized for the run's classes).
        path: the weights file (see read_state_dict for the formats accepted).
        label: the architecture as the user should read it in errors, e.g.
            "preresnet20 (pytorchcv preresnet20_cifar10)".

    Raises:
        UserError: the file is missing or unreadable, or any key other than the classifier's is
            missing, unexpected or of another shape.
    """
    path = Path(path).expanduser()
    state = read_state_dict(path)
    expected = model.state_dict()
    # Non-persistent buffers (e.g. Swin's attention masks) are rebuilt by the model itself;
    # a file that still carries them is fine.
    rebuilt = {name for name, _ in model.named_buffers()} - set(expected)
    head = classifier_name(model)

    unexpected = [k for k in state if k not in expected and k not in rebuilt]
    resized = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    head_keys = [k for k in resized if _is_head_resize(k, head, state[k].shape, expected[k].shape)]
    shapes = [
        f"{k} (file {list(state[k].shape)} vs model {list(expected[k].shape)})"
        for k in resized
        if k not in head_keys
    ]
    if unexpected or shapes:
        raise _mismatch_error(path, label, {"unexpected": unexpected, "shape": shapes})

    file_classes = state[head_keys[0]].shape[0] if head_keys else 0
    state = {k: v for k, v in state.items() if k in expected and k not in head_keys}
    # strict=False so that torch's own leniencies (e.g. BatchNorm's num_batches_tracked missing
    # from old checkpoints) apply; anything else it reports missing is an error.
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in head_keys]
    if missing:
        raise _mismatch_error(path, label, {"missing": missing})
    if head_keys:
        log.warning(
            "%s: classifier '%s' was trained for %d classes, the model has %d; loaded all other "
            "weights and kept the classifier freshly initialised",
            path, head, file_classes, expected[head_keys[0]].shape[0],
        )
