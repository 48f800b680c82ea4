"""The rivals' fast ops (issue #21) against the implementation they replaced, kept here as reference.

The functions prefixed `old_` are the plain-autograd code the rivals ran before (min/max clips,
bucketize projections, the compander through indexing and bucketize). On random inputs, at every
supported bit width, signed and unsigned, in fp32 (the fast kernels) and float64 (plain torch),
the new ops must give the same values and the same gradients for x and every parameter.
The float64 maths tests of tests/test_rivals.py stay as they were.
"""

from __future__ import annotations

import pytest
import torch

import nulsq.quant.rivals  # noqa: F401  (registers the kinds)
from nulsq.quant.base import QUANTIZERS
from nulsq.quant.rivals.apot import apot_magnitudes
from nulsq.quant.rivals.clip_base import clip_project
from nulsq.quant.rivals.dorefa import dorefa_act
from nulsq.quant.rivals.lcq import compand_quantize, compander_knots
from nulsq.quant.rivals.lqnets import all_codes, counts_and_sums
from nulsq.quant.rivals.pact import pact

from conftest import grads

# -- the implementation before issue #21 ------------------------------------------------------


def old_project(c, magnitudes, signed):
    mags = magnitudes.to(device=c.device, dtype=c.dtype)
    mids = (mags[1:] + mags[:-1]) / 2
    nearest = mags[torch.bucketize(c.abs(), mids)]
    return torch.sign(c) * nearest if signed else nearest


def old_clip_project(x, alpha, magnitudes, signed, clipped_ste=True):
    u = x / alpha
    c = u.clamp(-1.0 if signed else 0.0, 1.0)
    p = old_project(c.detach(), magnitudes, signed)
    y = alpha * (c + (p - c.detach()))
    if not clipped_ste:
        y = y + (x - x.detach()) * (c != u).to(x.dtype)
    return y


def old_pact(x, alpha, steps, signed):
    low = -alpha if signed else torch.zeros_like(alpha)
    y = torch.minimum(torch.maximum(x, low), alpha)
    step = alpha.detach() / steps
    return y + (torch.round(y.detach() / step) * step - y.detach())


def old_expand(u, slopes, offsets):
    j = torch.bucketize(u.detach(), offsets[1:].detach().to(u.dtype), right=True)
    return (u - offsets[j]) / slopes[j] + j.to(u.dtype) / slopes.numel()


def old_compand_quantize(x, alpha, theta, steps, signed):
    slopes, offsets = compander_knots(theta)
    k_count = theta.numel()
    v = ((x.abs() if signed else x) / alpha).clamp(0.0, 1.0)
    k = (v.detach() * k_count).floor().clamp(0, k_count - 1).long()
    u = slopes[k] * (v - k.to(v.dtype) / k_count) + offsets[k]
    u = u + (torch.round(u.detach() * steps) / steps - u.detach())
    y = alpha * old_expand(u, slopes, offsets)
    return torch.sign(x) * y if signed else y


def old_quantize_unit(r, steps):
    return r + (torch.round(r.detach() * steps) / steps - r.detach())


def old_dorefa_act(x, steps, signed):
    if not signed:
        return old_quantize_unit(x.clamp(0.0, 1.0), steps)
    return 2 * old_quantize_unit((x.clamp(-1.0, 1.0) + 1) / 2, steps) - 1


# -- harness -----------------------------------------------------------------------------------


def assert_same(new, old, dtype, what):
    """Same values and gradients: float64 to rounding, fp32 to fp32 rounding of sums."""
    (y_new, g_new), (y_old, g_old) = new, old
    atol = 1e-10 if dtype == torch.float64 else 2e-6
    # values to rounding of their own magnitude (a level rebuilt as L_0 + c_n may differ in an ulp)
    y_atol = atol * float(y_old.abs().max().clamp_min(1.0))
    torch.testing.assert_close(y_new, y_old, rtol=0, atol=y_atol, msg=f"{what}: values")
    torch.testing.assert_close(g_new[0], g_old[0], rtol=0, atol=atol, msg=f"{what}: dx")
    for i, (a, b) in enumerate(zip(g_new[1:], g_old[1:])):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=100 * atol,
                                   msg=f"{what}: parameter {i}")


def inputs(dtype, signed, n=3000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 1.2
    x = x if signed else x.abs()  # activations after ReLU, a few beyond the clip
    dy = torch.randn(n, generator=gen, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


DTYPES = [torch.float32, torch.float64]


# -- pins ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_pact_matches_the_old_op(bits, signed, dtype):
    steps = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x, dy = inputs(dtype, signed, seed=bits)
    alpha = torch.tensor(1.7, dtype=dtype)
    new = grads(lambda x_, a: pact(x_, a, steps, signed), x, dy, [alpha])
    old = grads(lambda x_, a: old_pact(x_, a, steps, signed), x, dy, [alpha])
    assert_same(new, old, dtype, f"pact {bits}-bit")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clipped", [True, False])
@pytest.mark.parametrize("signed, bits", [(False, b) for b in range(2, 7)] + [(True, b) for b in range(1, 6)])
def test_clip_project_matches_the_old_op(bits, signed, clipped, dtype):
    mags = apot_magnitudes(bits)  # APoT's sets; 1 magnitude bit = LCQ's ternary weights
    x, dy = inputs(dtype, signed, seed=10 + bits)
    alpha = torch.tensor(1.3, dtype=dtype)
    new = grads(lambda x_, a: clip_project(x_, a, mags, signed, clipped), x, dy, [alpha])
    old = grads(lambda x_, a: old_clip_project(x_, a, mags, signed, clipped), x, dy, [alpha])
    assert_same(new, old, dtype, f"clip_project B={bits}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_lcq_compander_matches_the_old_op(bits, signed, dtype):
    steps = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    x, dy = inputs(dtype, signed, seed=20 + bits)
    alpha = torch.tensor(1.6, dtype=dtype)
    theta = torch.randn(16, generator=torch.Generator().manual_seed(bits), dtype=dtype) * 0.5
    new = grads(lambda x_, a, t: compand_quantize(x_, a, t, steps, signed, "compander"), x, dy,
                [alpha, theta])
    old = grads(lambda x_, a, t: old_compand_quantize(x_, a, t, steps, signed), x, dy, [alpha, theta])
    assert_same(new, old, dtype, f"lcq {bits}-bit")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", range(2, 9))
def test_dorefa_activation_matches_the_old_op(bits, signed, dtype):
    x, dy = inputs(dtype, signed, seed=30 + bits)
    x = x * 0.8
    new = grads(lambda x_: dorefa_act(x_, 2**bits - 1, signed), x, dy, [])
    old = grads(lambda x_: old_dorefa_act(x_, 2**bits - 1, signed), x, dy, [])
    assert_same(new, old, dtype, f"dorefa {bits}-bit")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lqnets_levels_match_the_old_search(bits, signed, dtype):
    q = QUANTIZERS.get("lqnets")(bits=bits, signed=signed, role="weight" if signed else "act",
                                 ste="identity").to(dtype).eval()
    gen = torch.Generator().manual_seed(40 + bits)
    q.basis.copy_(torch.rand(bits, generator=gen, dtype=torch.float64) * 2.0 ** torch.arange(bits))
    x, dy = inputs(dtype, signed, seed=40 + bits)
    x = x * 2 ** (bits - 1)
    levels = q.sorted_levels(q.basis.to(dtype))[0]
    mids = (levels[1:] + levels[:-1]) / 2
    old = (levels[torch.bucketize(x, mids)], [dy])
    y, g = grads(q, x, dy, [])
    assert_same((y, g), old, dtype, f"lqnets {bits}-bit")


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_lqnets_qem_statistics_match_a_scatter(bits, signed):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 500, generator=gen, dtype=torch.float64)
    basis = torch.rand(3, bits, generator=gen, dtype=torch.float64) + 0.1
    values = (all_codes(bits, signed).double() * basis[:, None, :]).sum(-1)
    levels = values.sort(dim=1).values
    idx = torch.searchsorted((levels[:, 1:] + levels[:, :-1]) / 2, x)
    counts = torch.zeros_like(levels).scatter_add_(1, idx, torch.ones_like(x))
    sums = torch.zeros_like(levels).scatter_add_(1, idx, x)
    got_counts, got_sums = counts_and_sums(x, levels)
    torch.testing.assert_close(got_counts, counts, rtol=0, atol=0)
    torch.testing.assert_close(got_sums, sums, rtol=0, atol=1e-10)


def test_fast_ops_save_no_int64_tensor_for_backward():
    """The compander saves one int32 index per element, never an int64 one (issue #21)."""
    x = torch.randn(4, 8, 5, 5).abs().requires_grad_()
    alpha = torch.tensor(1.0, requires_grad=True)
    theta = torch.zeros(16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        compand_quantize(x, alpha, theta, 3, False).sum().backward()
    big = [t for t in saved if t.numel() == x.numel()]
    assert big and all(t.dtype != torch.int64 for t in big), [t.dtype for t in big]


@pytest.mark.slow  # about 20 s: dynamo traces five small graphs (aot_eager: no code generation)
@pytest.mark.parametrize("kind, signed, role, args", [
    ("pact", False, "act", {}), ("apot", True, "weight", {}), ("lcq", False, "act", {}),
    ("dorefa", False, "act", {}), ("lqnets", False, "act", {})])
def test_rival_ops_trace_without_graph_breaks(kind, signed, role, args):
    """torch.compile sees each op whole (no graph break) and gives the eager gradients."""
    q = QUANTIZERS.get(kind)(bits=2, signed=signed, role=role, **args).eval()
    x = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    x = x if signed else x.relu()
    weight = torch.arange(x.numel(), dtype=torch.float32).view_as(x)

    def loss(x_):
        return (q(x_) * weight).sum()

    def grads_of(fn):
        xg = x.clone().requires_grad_()
        fn(xg).backward()
        out = [xg.grad] + [p.grad.clone() for p in q.parameters()]
        q.zero_grad(set_to_none=True)
        return out

    assert torch._dynamo.explain(loss)(x.clone().requires_grad_()).graph_break_count == 0
    torch._dynamo.reset()
    for got, want in zip(grads_of(torch.compile(loss, backend="aot_eager")), grads_of(loss)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lcq_cell_sums_spread_over_gpu_lanes_give_the_same_gradients(monkeypatch):
    """A GPU spreads the compander's per-cell scatter sums over many lanes (atomics into one cell
    serialise); the sums, and so every gradient, stay those of the CPU's 8 lanes."""
    from nulsq.quant import kernels
    from nulsq.quant.rivals import lcq

    assert lcq.lane_count(torch.device("cpu"), 64) == 8
    assert lcq.lane_count(torch.device("cuda"), 64) == 1024  # 2-bit, K = 16
    assert lcq.lane_count(torch.device("cuda"), 16 * 256) == 256  # 8-bit: bins stay <= 2^20
    x, dy = inputs(torch.float32, True, seed=7)
    theta = torch.randn(16, generator=torch.Generator().manual_seed(7)) * 0.5
    for grad in ("authors", "compander"):
        def op(x_, a, t, grad=grad):
            return compand_quantize(x_, a, t, 7, True, grad)

        with kernels.reference_kernels():  # the torch code, which GPUs run
            cpu_style = grads(op, x, dy, [torch.tensor(1.6), theta])
            monkeypatch.setattr(lcq, "lane_count", lambda device, cells: 256)
            gpu_style = grads(op, x, dy, [torch.tensor(1.6), theta])
            monkeypatch.undo()
        assert_same(gpu_style, cpu_style, torch.float32, f"lcq lanes {grad}")
