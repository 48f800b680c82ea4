"""`functional` asks the kernel table for a device's fast path on its first op call; importing the
kernels package registers nothing by itself, and an explicit choice made before is kept."""

from __future__ import annotations

import pytest
import torch

from nulsq.quant import functional as F
from nulsq.quant import kernels
from nulsq.quant.kernels import cpu_quant


@pytest.fixture
def fresh(monkeypatch):
    """The dispatch state of a process that has not run an op yet."""
    monkeypatch.setattr(F, "_FAST_PATHS", {})
    monkeypatch.setattr(F, "_fast_paths_loaded", False)
    monkeypatch.setattr(kernels, "_enabled", [])
    monkeypatch.delenv(kernels.ENV_VAR, raising=False)
    return monkeypatch


def test_the_first_op_call_loads_the_fast_paths(fresh):
    assert F._FAST_PATHS == {}  # nothing registered before an op runs
    assert F._kernel("nulsq", torch.zeros(1)) is cpu_quant.KERNELS["nulsq"]
    assert "cpu" in kernels.enabled()


def test_the_environment_switch_keeps_the_reference(fresh):
    fresh.setenv(kernels.ENV_VAR, "0")
    assert F._kernel("lsq", torch.zeros(1)) is F._REFERENCE["lsq"]
    assert kernels.enabled() == []


def test_disable_before_the_first_op_is_kept(fresh):
    kernels.disable()
    assert F._kernel("lsq", torch.zeros(1)) is F._REFERENCE["lsq"]
    with kernels.reference_kernels():
        pass
    assert F._kernel("lsq", torch.zeros(1)) is F._REFERENCE["lsq"]


def test_the_c_sources_are_package_data():
    sources = cpu_quant.c_sources()
    assert list(sources) == ["cpu_common.h", "cpu_quant.c", "cpu_rivals.c"]
    assert "nulsq_backward" in sources["cpu_quant.c"] and "lcq_backward" in sources["cpu_rivals.c"]
    assert all(text.lstrip().startswith("/*") for text in sources.values())
