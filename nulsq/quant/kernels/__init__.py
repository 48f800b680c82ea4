"""Fast paths for the quantizer ops: the kernel table `functional` asks on its first op call.

Same public functions (`functional.lsq`, `functional.nulsq`), same results (tests/test_kernels.py
checks them against the reference kernels): only faster.
- CPU: fused C kernels (`cpu_quant`), built with the system C compiler on first use (5-10 s on
  2 cores, then cached per machine); if that fails, one warning and the reference kernels.
- CUDA: Triton kernels (`triton_quant`), when `triton` imports and a GPU is visible.
  (Under TRITON_INTERPRET=1 they also run on CPU tensors; the tests call them directly then.)
- Under torch.compile, any device: elementwise torch code (`fusable`) that inductor fuses with the
  neighbouring layers. NULSQ_COMPILE_FUSION=0 makes compiled graphs call the device's opaque
  kernels instead (an A/B for scripts/bench.py).

Importing this package registers nothing: `functional` calls `load_defaults()` once, when the
first op runs (every available fast path, unless NULSQ_FAST_KERNELS=0). Call `disable()` /
`enable()` at run time for A/B benchmarks and debugging; either one, called first, replaces the
defaults.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from nulsq.quant import functional as F

ENV_VAR = "NULSQ_FAST_KERNELS"
FUSION_ENV_VAR = "NULSQ_COMPILE_FUSION"
OPS = ("lsq", "nulsq")


# -- layout helpers shared by the kernels (which walk a tensor's memory as one flat array) -------


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if its elements fill its memory without gaps or overlaps in some dimension order
    (contiguous, channels_last, any permutation of those), else a contiguous copy. The kernels
    then write y and dx with `empty_like(x)`, which keeps such a layout."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    return x if x.permute(order).is_contiguous() else x.contiguous()


def like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t (a dy) with x's dtype and strides, copying only when they differ."""
    if t.dtype == x.dtype and t.stride() == x.stride():
        return t
    return torch.empty_like(x).copy_(t)


def _cpu() -> dict[str, F.Kernel]:
    from nulsq.quant.kernels import cpu_quant

    return cpu_quant.KERNELS


def _cuda() -> dict[str, F.Kernel] | None:
    if not torch.cuda.is_available():
        return None
    try:
        from nulsq.quant.kernels import triton_quant
    except ImportError:  # no triton: the reference kernels serve CUDA too
        return None
    return triton_quant.KERNELS


def _compile() -> dict[str, F.Kernel] | None:
    if not _env_flag(FUSION_ENV_VAR):  # compile then launches the device's own (opaque) kernels
        return None
    from nulsq.quant.kernels import fusable

    return fusable.KERNELS


# device type -> how to get its kernels (None when this machine cannot run them); "compile" is
# the path taken while torch.compile traces (see functional._kernel)
_PROVIDERS = {"cpu": _cpu, "cuda": _cuda, "compile": _compile}
_enabled: list[str] = []


def available() -> dict[str, dict[str, F.Kernel]]:
    """The fast kernels this machine can run: device type -> op name -> Kernel."""
    found = {}
    for device_type, provider in _PROVIDERS.items():
        kernels = provider()
        if kernels is not None:
            found[device_type] = kernels
    return found


def load_defaults() -> None:
    """The default fast paths: every available one, unless NULSQ_FAST_KERNELS says 0."""
    if env_allows():
        enable()


def enable() -> list[str]:
    """Register every available fast path; returns the device types now served by one."""
    F.load_fast_paths()  # a first call decides here, so the defaults do not run again later
    disable()
    for device_type, kernels in available().items():
        for op in OPS:
            F.register_fast_path(op, device_type, kernels[op])
        _enabled.append(device_type)
    return list(_enabled)


def disable() -> None:
    """Route every op back to the reference kernels."""
    F.load_fast_paths()
    for device_type in _enabled:
        for op in OPS:
            F.register_fast_path(op, device_type, None)
    _enabled.clear()


def enabled() -> list[str]:
    """The device types currently served by a fast path."""
    F.load_fast_paths()
    return list(_enabled)


@contextlib.contextmanager
def reference_kernels() -> Iterator[None]:
    """Run a block with the reference kernels, restoring the fast paths afterwards."""
    was = enabled()
    disable()
    try:
        yield
    finally:
        if was:
            enable()


def _env_flag(name: str) -> bool:
    """False when the variable says 0 / false / no / off; True when it is unset."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def opaque_under_compile() -> Iterator[None]:
    """Run a block whose torch.compile traces call the device's own kernels (the A/B of fusion)."""
    F.load_fast_paths()
    removed = {op: F.register_fast_path(op, "compile", None) for op in OPS}
    try:
        yield
    finally:
        for op, kernel in removed.items():
            if kernel is not None:
                F.register_fast_path(op, "compile", kernel)


def env_allows() -> bool:
    """False when NULSQ_FAST_KERNELS says 0 / false / no / off."""
    return _env_flag(ENV_VAR)
