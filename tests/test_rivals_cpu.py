"""The rivals' C kernels (nulsq/quant/kernels/cpu_rivals.c) against the rivals' own torch code.

Each rival op runs twice on the same fp32 input: once as it runs in eager mode on the CPU (the C
kernels) and once with the fast kernels disabled (`kernels.reference_kernels()`, the torch code
that torch.compile traces and CUDA runs). Values and every gradient must agree, for every bit
width, signed and unsigned, both STEs / gradient modes; bf16 inputs must give the fp32 result
rounded once; several threads the one-thread sums.
"""

from __future__ import annotations

import math

import pytest
import torch

import nulsq.quant.rivals  # noqa: F401  (registers the kinds)
from nulsq.quant import kernels
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.kernels import cpu_rivals
from nulsq.quant.rivals.apot import apot_magnitudes
from nulsq.quant.rivals.clip_base import clip_project
from nulsq.quant.rivals.lcq import compand_quantize
from nulsq.quant.rivals.lqnets import counts_and_sums
from nulsq.quant.rivals.pact import pact
from nulsq.train.run import _warn_cpu_compile
from nulsq.train.runtime import resolve_runtime

from conftest import compose_config, grads


def fast_and_torch(op, x, dy, params):
    assert cpu_rivals.ready(x), "the C kernels did not build: the comparison would be vacuous"
    fast = grads(op, x, dy, params)
    with kernels.reference_kernels():
        assert not cpu_rivals.ready(x)
        slow = grads(op, x, dy, params)
    return fast, slow


def assert_agree(fast, slow, what):
    (y_f, g_f), (y_s, g_s) = fast, slow
    scale = float(y_s.abs().max().clamp_min(1.0))
    torch.testing.assert_close(y_f, y_s, rtol=0, atol=2e-6 * scale, msg=f"{what}: values")
    torch.testing.assert_close(g_f[0], g_s[0], rtol=0, atol=2e-6, msg=f"{what}: dx")
    for i, (a, b) in enumerate(zip(g_f[1:], g_s[1:])):
        s = b.abs().max().clamp_min(1.0)  # sums of 20000 terms, fp32 blocks vs torch's order
        torch.testing.assert_close(a / s, b / s, rtol=0, atol=5e-5, msg=f"{what}: parameter {i}")


def inputs(signed, n=20000, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, n // 4, generator=gen) * 1.2
    x = x if signed else x.relu()  # activations after ReLU: half exact zeros, a few beyond the clip
    return x.to(dtype), torch.randn(4, n // 4, generator=gen).to(dtype)


@pytest.mark.parametrize("grad", ["authors", "compander"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits, k_count", [(2, 16), (3, 16), (4, 16), (8, 16), (2, 1), (3, 5)])
def test_lcq_kernel_matches_its_torch_code(bits, k_count, signed, grad):
    steps = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x, dy = inputs(signed, seed=bits)
    alpha = torch.tensor(1.4)
    theta = torch.randn(k_count, generator=torch.Generator().manual_seed(k_count)) * 0.5
    fast, slow = fast_and_torch(lambda x_, a, t: compand_quantize(x_, a, t, steps, signed, grad), x,
                                dy, [alpha, theta])
    assert_agree(fast, slow, f"lcq {bits}-bit K={k_count} {grad}")


@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("signed, bits", [(False, b) for b in range(2, 7)] + [(True, b) for b in range(1, 6)])
def test_clip_project_kernel_matches_its_torch_code(bits, signed, clipped):
    x, dy = inputs(signed, seed=10 + bits)
    fast, slow = fast_and_torch(
        lambda x_, a: clip_project(x_, a, apot_magnitudes(bits), signed, clipped), x, dy,
        [torch.tensor(1.3)])
    assert_agree(fast, slow, f"clip_project B={bits}")


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pact_kernel_matches_its_torch_code(bits, signed):
    steps = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x, dy = inputs(signed, seed=20 + bits)
    x[0, :4] = torch.tensor([1.5, -1.5, 0.0, 3.0])  # on the clip (alpha = 1.5) and at zero
    fast, slow = fast_and_torch(lambda x_, a: pact(x_, a, steps, signed), x, dy, [torch.tensor(1.5)])
    assert_agree(fast, slow, f"pact {bits}-bit")


@pytest.mark.parametrize("ste", ["default", "identity"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits, training", [(2, True), (3, True), (4, True), (8, False)])
def test_lqnets_kernels_match_their_torch_code(bits, training, signed, ste):
    """The forward (training: after a QEM fit on the batch), the nearest level and the STE's
    backward. (At 8 bits a fit solves 8 normal equations from 256 levels' sums: float64 vs fp32
    accumulation moves the basis by ~1e-6, enough to move elements near a midpoint, so the 8-bit
    case compares the forward on a fixed basis.)"""
    def make():
        q = QUANTIZERS.get("lqnets")(bits=bits, signed=signed, role="weight" if signed else "act",
                                     ste=ste).train(training)
        gen = torch.Generator().manual_seed(bits)
        q.basis.copy_(torch.rand(bits, generator=gen) * 2.0 ** torch.arange(bits))
        return q

    x, dy = inputs(signed, seed=30 + bits)
    quantizers = []

    def op(x_):
        quantizers.append(make())
        return quantizers[-1](x_ * 2 ** (bits - 1))

    fast, slow = fast_and_torch(op, x, dy, [])
    assert_agree(fast, slow, f"lqnets {bits}-bit")
    torch.testing.assert_close(quantizers[0].basis, quantizers[1].basis, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4, 6])
def test_qem_statistics_kernel_counts_exactly(bits):
    levels = torch.linspace(-1.0, 1.0, 2**bits)[None]
    x = torch.randn(1, 30000, generator=torch.Generator().manual_seed(bits))
    x[0, :3] = (levels[0, 1:4] + levels[0, :3]) / 2  # on midpoints: the lower level
    counts, sums = counts_and_sums(x, levels)
    idx = torch.searchsorted((levels[:, 1:] + levels[:, :-1]) / 2, x)
    want_counts = torch.zeros_like(levels).scatter_add_(1, idx, torch.ones_like(x))
    want_sums = torch.zeros_like(levels).double().scatter_add_(1, idx, x.double())
    torch.testing.assert_close(counts, want_counts, rtol=0, atol=0)
    torch.testing.assert_close(sums.double(), want_sums, rtol=0, atol=1e-3)


def _all_rival_ops(bits=3):
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(16, generator=gen) * 0.5
    return {
        "lcq": (lambda x_, a: compand_quantize(x_, a, theta, 2**bits - 1, False, "authors"), True),
        "lcq signed": (lambda x_, a: compand_quantize(x_, a, theta, 2 ** (bits - 1) - 1, True,
                                                       "compander"), True),
        "apot": (lambda x_, a: clip_project(x_, a, apot_magnitudes(bits), False, True), True),
        "pact": (lambda x_, a: pact(x_, a, 2**bits - 1, False), True),
    }


@pytest.mark.parametrize("name", list(_all_rival_ops()))
def test_bf16_inputs_give_the_fp32_result_rounded_once(name):
    op, _ = _all_rival_ops()[name]
    x, dy = inputs(signed=name.endswith("signed"), seed=50)
    xb = x.bfloat16()
    y16, (dx16, da16) = grads(op, xb, dy.bfloat16(), [torch.tensor(1.4)])
    y32, (dx32, da32) = grads(op, xb.float(), dy.bfloat16().float(), [torch.tensor(1.4)])
    assert y16.dtype == dx16.dtype == torch.bfloat16 and da16.dtype == torch.float32
    torch.testing.assert_close(y16, y32.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(dx16, dx32.bfloat16(), rtol=0, atol=0)
    torch.testing.assert_close(da16, da32, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(_all_rival_ops()))
def test_two_threads_give_the_one_thread_sums(name):
    op, _ = _all_rival_ops()[name]
    x, dy = inputs(signed=name.endswith("signed"), n=300_000, seed=60)  # enough for 2 threads
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = grads(op, x, dy, [torch.tensor(1.4)])
        torch.set_num_threads(2)
        two = grads(op, x, dy, [torch.tensor(1.4)])
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(two[0], one[0], rtol=0, atol=0)
    torch.testing.assert_close(two[1][0], one[1][0], rtol=0, atol=0)
    torch.testing.assert_close(two[1][1], one[1][1], rtol=1e-5, atol=1e-4)


def test_lcq_kernel_passes_nan_through_and_stays_in_its_tables():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 1e30, -1e30, 0.5])
    theta = torch.randn(16, generator=torch.Generator().manual_seed(1))
    y = compand_quantize(x, torch.tensor(2.0), theta, 1, True)
    top = float(y[1])  # alpha g^-1(1): alpha up to the table's rounding
    assert math.isnan(y[0]) and abs(top - 2.0) < 1e-5 and y[3] == 0
    assert y[2:].tolist()[:4] == [-top, 0.0, top, -top]


def test_the_c_path_saves_only_the_input_for_backward():
    x = torch.randn(4, 8, 5, 5).relu().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        compand_quantize(x, torch.tensor(1.0, requires_grad=True),
                         torch.zeros(16, requires_grad=True), 3, False).sum().backward()
    big = [t for t in saved if t.numel() == x.numel()]
    assert len(big) == 1 and big[0].data_ptr() == x.data_ptr()


@pytest.mark.parametrize("quantizer, compile, warned", [
    ("lcq", True, True), ("lqnets", True, True), ("lcq", False, False), ("nulsq_a", True, False)])
def test_compile_on_the_cpu_with_a_rival_says_eager_is_faster(quantizer, compile, warned, caplog):
    cfg = compose_config([f"quantizer={quantizer}", "trainer.device=cpu",
                          f"trainer.compile={str(compile).lower()}"])
    with caplog.at_level("WARNING", logger="nulsq.train.run"):
        _warn_cpu_compile(cfg, resolve_runtime(cfg.trainer))
    lines = [r.getMessage() for r in caplog.records if "trainer.compile=true" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert quantizer in lines[0] and "trainer.compile=auto" in lines[0]
