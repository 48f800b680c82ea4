"""The quantizer maths against float64 transcriptions of the supplement's equations.

References below are written from the equations (step functions of Eq. 1 and 5, the case analyses
of Eq. 4, 10 and 12 with Eq. 13's sum running to k), not from the code under test.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from nulsq.quant import functional as F
from nulsq.quant.base import signed_range

BITS = (2, 3, 4)


# -- float64 references -------------------------------------------------------------------------


def sigma(z: torch.Tensor) -> torch.Tensor:
    """The unit step with sigma(0) = 0, which sends ties to the level nearer zero."""
    return (z > 0).double()


def lsq_forward_eq1(x: torch.Tensor, s: float, qn: int, qp: int) -> torch.Tensor:
    y = torch.zeros_like(x)
    for n in range(1, qp + 1):
        y += s * sigma(x - (n - 0.5) * s)
    for n in range(1, qn + 1):
        y -= s * sigma(-x - (n - 0.5) * s)
    return y


def lsq_step_grad_eq4(x: torch.Tensor, s: float, qn: int, qp: int) -> torch.Tensor:
    xs = x / s
    inside = torch.round(xs) - xs
    return torch.where(xs <= -qn, -float(qn), torch.where(xs >= qp, float(qp), inside))


def nulsq_forward_eq5(x: torch.Tensor, s: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    c, c_neg = torch.cumsum(s, 0), torch.cumsum(s_neg, 0)
    y = torch.zeros_like(x)
    for n in range(len(s)):
        y += s[n] * sigma(x - c[n] + s[n] / 2)
    for n in range(len(s_neg)):
        y -= s_neg[n] * sigma(-x - c_neg[n] + s_neg[n] / 2)
    return y


def nulsq_step_grads_eq10_12(
    x: torch.Tensor, s: torch.Tensor, s_neg: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element dy/ds_k (Qp, N) and dy/ds'_k (Qn, N), clip branches closed."""
    qp, qn = len(s), len(s_neg)
    c = torch.cat([torch.zeros(1, dtype=x.dtype), torch.cumsum(s, 0)])
    c_neg = torch.cat([torch.zeros(1, dtype=x.dtype), torch.cumsum(s_neg, 0)])
    pos = torch.zeros(qp, len(x), dtype=x.dtype)
    for k in range(1, qp + 1):
        d_k = sigma(x - c[k] + s[k - 1] / 2) - (x - c[k - 1]) / s[k - 1]  # Eq. 11
        in_bin = (c[k - 1] <= x) & (x < c[k])
        pos[k - 1] = torch.where(x >= c[qp], 1.0, torch.where(in_bin, d_k, 0.0))
    neg = torch.zeros(qn, len(x), dtype=x.dtype)
    for k in range(1, qn + 1):
        b_k = -sigma(-x - c_neg[k] + s_neg[k - 1] / 2) - (x + c_neg[k - 1]) / s_neg[k - 1]  # Eq. 13
        in_bin = (-c_neg[k] < x) & (x <= -c_neg[k - 1])
        neg[k - 1] = torch.where(x <= -c_neg[qn], -1.0, torch.where(in_bin, b_k, 0.0))
    return pos, neg


def nulsq_dx_mask(x: torch.Tensor, s: torch.Tensor, s_neg: torch.Tensor) -> torch.Tensor:
    return ((x >= -s_neg.sum()) & (x <= s.sum())).double()


# -- helpers ------------------------------------------------------------------------------------


def random_steps(n: int, gen: torch.Generator) -> torch.Tensor:
    return 0.05 + 0.5 * torch.rand(n, generator=gen)


def spread_inputs(low: float, high: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """Uniform on a range 30% wider than [low, high] on each side, so both clips are hit."""
    margin = 0.3 * (high - low) + 0.1
    return (low - margin) + (high - low + 2 * margin) * torch.rand(n, generator=gen)


def run_nulsq(x, pos, neg, dy, grad_scale=1.0):
    """Forward and backward of F.nulsq on leaf copies; returns y, dx, dpos, dneg."""
    x = x.clone().requires_grad_()
    pos = pos.clone().requires_grad_()
    neg = None if neg is None else neg.clone().requires_grad_()
    y = F.nulsq(x, pos, neg, grad_scale)
    y.backward(dy)
    return y.detach(), x.grad, pos.grad, None if neg is None else neg.grad


def run_lsq(x, step, qn, qp, dy, grad_scale=1.0):
    x = x.clone().requires_grad_()
    step = step.clone().requires_grad_()
    y = F.lsq(x, step, qn, qp, grad_scale)
    y.backward(dy)
    return y.detach(), x.grad, step.grad


# -- nuLSQ against Eq. 5 and Eq. 10-12 -----------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS + (8,))
def test_nulsq_matches_equations(bits: int, signed: bool) -> None:
    gen = torch.Generator().manual_seed(100 * bits + signed)
    qn, qp = signed_range(bits, signed)
    pos = random_steps(qp, gen)
    neg = random_steps(qn, gen) if signed else None
    neg64 = torch.zeros(0, dtype=torch.float64) if neg is None else neg.double()
    x = spread_inputs(-neg64.sum().item(), pos.sum().item(), 4000, gen)
    dy = torch.randn(x.shape, generator=gen)
    grad_scale = 0.37

    y, dx, dpos, dneg = run_nulsq(x, pos, neg, dy, grad_scale)

    x64, dy64 = x.double(), dy.double()
    ref_pos, ref_neg = nulsq_step_grads_eq10_12(x64, pos.double(), neg64)
    # The test itself must reach every interval and both clip branches.
    assert (ref_pos.abs() > 0).sum(1).min() > 3
    assert (x64 > pos.sum()).any() and (x64 < -neg64.sum() - 0.01).any()
    y_ref = nulsq_forward_eq5(x64, pos.double(), neg64)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(dx.double(), dy64 * nulsq_dx_mask(x64, pos.double(), neg64))
    torch.testing.assert_close(dpos.double(), grad_scale * ref_pos @ dy64, atol=2e-4, rtol=1e-5)
    if signed:
        torch.testing.assert_close(dneg.double(), grad_scale * ref_neg @ dy64, atol=2e-4, rtol=1e-5)


def test_nulsq_gpu_style_bin_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-cell sums that GPUs spread over copies of the bins give the same gradients."""
    gen = torch.Generator().manual_seed(5)
    pos, neg = random_steps(7, gen), random_steps(8, gen)
    x = spread_inputs(-neg.sum().item(), pos.sum().item(), 3001, gen)
    dy = torch.randn(x.shape, generator=gen)
    plain = run_nulsq(x, pos, neg, dy)
    monkeypatch.setattr(F, "_bin_copies", lambda device: 8)
    spread = run_nulsq(x, pos, neg, dy)
    for a, b in zip(plain, spread):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_nulsq_ties_go_toward_zero(bits: int, signed: bool) -> None:
    """x exactly on a threshold c_n - s_n/2 (dyadic steps, so the points are exact)."""
    qn, qp = signed_range(bits, signed)
    pos = torch.tensor([0.25, 0.5, 0.75, 1.0] * 4)[:qp]
    neg = torch.tensor([0.5, 0.25, 1.0, 0.75] * 2)[:qn] if signed else None
    neg64 = torch.zeros(0, dtype=torch.float64) if neg is None else neg.double()
    c = torch.cumsum(pos, 0)
    ties = c - pos / 2
    if signed:
        ties = torch.cat([ties, -(torch.cumsum(neg, 0) - neg / 2)])
    dy = torch.ones_like(ties)
    y, _, dpos, dneg = run_nulsq(ties, pos, neg, dy)
    torch.testing.assert_close(y.double(), nulsq_forward_eq5(ties.double(), pos.double(), neg64))
    assert (y.abs() < ties.abs()).all()  # the level nearer zero
    ref_pos, ref_neg = nulsq_step_grads_eq10_12(ties.double(), pos.double(), neg64)
    torch.testing.assert_close(dpos.double(), ref_pos.sum(1))
    if signed:
        torch.testing.assert_close(dneg.double(), ref_neg.sum(1))


# -- LSQ against Eq. 1 and Eq. 4 -----------------------------------------------------------------


@pytest.mark.parametrize("step_shape", [(), (1,)])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_lsq_matches_equations(bits: int, signed: bool, step_shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(10 * bits + signed)
    qn, qp = signed_range(bits, signed)
    step = torch.full(step_shape, 0.1 + torch.rand(1, generator=gen).item())
    s = step.double().reshape(()).item()
    x = spread_inputs(-qn * s, qp * s, 4000, gen)
    dy = torch.randn(x.shape, generator=gen)

    y, dx, dstep = run_lsq(x, step, qn, qp, dy, grad_scale=0.37)

    x64, dy64 = x.double(), dy.double()
    assert dstep.shape == step.shape
    torch.testing.assert_close(y.double(), lsq_forward_eq1(x64, s, qn, qp), atol=1e-6, rtol=0)
    inside = ((x64 >= -qn * s) & (x64 <= qp * s)).double()
    torch.testing.assert_close(dx.double(), dy64 * inside)
    ref = 0.37 * (lsq_step_grad_eq4(x64, s, qn, qp) * dy64).sum()
    torch.testing.assert_close(dstep.double().reshape(()), ref, atol=2e-4, rtol=1e-5)


# -- the reduction: nuLSQ with equal steps is LSQ, element by element ----------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", BITS)
def test_nulsq_with_equal_steps_reduces_to_lsq(bits: int, signed: bool) -> None:
    qn, qp = signed_range(bits, signed)
    s = 0.375  # dyadic: levels, clip points and x below are exact in fp32
    # Every level (clip points included) plus points between them and beyond both clips; exact
    # half-way points are left out (LSQ rounds half to even there, nuLSQ toward zero).
    levels = torch.arange(-qn - 2, qp + 3.0)
    t = torch.cat([levels, torch.arange(-qn - 2, qp + 2.0, 1 / 16) + 1 / 64])
    xs = (t * s).float()
    pos = torch.full((qp,), s)
    neg = torch.full((qn,), s) if signed else None
    for x in xs:
        x1, one = x.reshape(1), torch.ones(1)
        y_nu, dx_nu, dpos, dneg = run_nulsq(x1, pos, neg, one)
        y_lsq, dx_lsq, dstep = run_lsq(x1, torch.tensor(s), qn, qp, one)
        eq4 = lsq_step_grad_eq4(x1.double(), s, qn, qp)
        total = dpos.double().sum() + (0.0 if dneg is None else dneg.double().sum())
        assert y_nu.item() == y_lsq.item(), x.item()
        assert dx_nu.item() == dx_lsq.item(), x.item()
        torch.testing.assert_close(total.reshape(1), eq4, atol=1e-6, rtol=0, msg=f"x={x.item()}")
        torch.testing.assert_close(dstep.double().reshape(1), eq4, atol=1e-6, rtol=0)


# -- the clip points: closed intervals on both sides ---------------------------------------------


def test_nulsq_gradients_at_clip_points() -> None:
    pos = torch.tensor([0.25, 0.5, 0.125])  # c_Qp = 0.875
    neg = torch.tensor([0.5, 0.25])  # -c'_Qn = -0.75
    top, bottom = torch.tensor(0.875), torch.tensor(-0.75)
    cases = {
        # x: (y, dx, dpos, dneg)
        top.item(): (0.875, 1.0, [1.0, 1.0, 1.0], [0.0, 0.0]),
        torch.nextafter(top, torch.tensor(9.0)).item(): (0.875, 0.0, [1.0, 1.0, 1.0], [0.0, 0.0]),
        bottom.item(): (-0.75, 1.0, [0.0, 0.0, 0.0], [-1.0, -1.0]),
        torch.nextafter(bottom, torch.tensor(-9.0)).item(): (-0.75, 0.0, [0.0] * 3, [-1.0, -1.0]),
    }
    for x, (y_ref, dx_ref, dpos_ref, dneg_ref) in cases.items():
        y, dx, dpos, dneg = run_nulsq(torch.tensor([x]), pos, neg, torch.ones(1))
        assert y.item() == y_ref and dx.item() == dx_ref, x
        assert dpos.tolist() == dpos_ref and dneg.tolist() == dneg_ref, x
    # Just inside the top: the last interval's round(u) - u with u -> 1, i.e. about 0.
    inside = torch.nextafter(top, torch.tensor(0.0)).reshape(1)
    y, dx, dpos, _ = run_nulsq(inside, pos, neg, torch.ones(1))
    assert dx.item() == 1.0 and y.item() == 0.875
    torch.testing.assert_close(dpos, torch.zeros(3), atol=1e-5, rtol=0)


def test_lsq_gradients_at_clip_points() -> None:
    s, qn, qp = torch.tensor(0.25), 4, 3
    cases = {0.75: (1.0, 3.0), 0.76: (0.0, 3.0), -1.0: (1.0, -4.0), -1.01: (0.0, -4.0)}
    for x, (dx_ref, ds_ref) in cases.items():
        _, dx, ds = run_lsq(torch.tensor([x]), s, qn, qp, torch.ones(1))
        assert dx.item() == dx_ref and ds.item() == pytest.approx(ds_ref), x


def test_unsigned_nulsq_below_zero() -> None:
    """Unsigned: x < 0 maps to 0 with no gradient; x == 0 is inside the closed interval."""
    pos = torch.tensor([0.3, 0.2, 0.4])
    y, dx, dpos, dneg = run_nulsq(torch.tensor([-0.5, -1e-9, 0.0]), pos, None, torch.ones(3))
    assert y.tolist() == [0.0, 0.0, 0.0] and dx.tolist() == [0.0, 0.0, 1.0]
    assert dpos.abs().max().item() < 1e-6 and dneg is None


# -- dtypes, shapes, the saved tensors, compile --------------------------------------------------


def test_bf16_input() -> None:
    gen = torch.Generator().manual_seed(7)
    qn, qp = signed_range(3, True)
    pos, neg = random_steps(qp, gen), random_steps(qn, gen)
    x = spread_inputs(-neg.sum().item(), pos.sum().item(), 3000, gen).bfloat16()
    dy = torch.randn(x.shape, generator=gen).bfloat16()

    y, dx, dpos, dneg = run_nulsq(x, pos, neg, dy, grad_scale=0.5)
    y32, dx32, _, _ = run_nulsq(x.float(), pos, neg, dy.float(), grad_scale=0.5)
    assert y.dtype == dx.dtype == torch.bfloat16 and dpos.dtype == dneg.dtype == torch.float32
    assert torch.equal(y, y32.bfloat16()) and torch.equal(dx, dx32.bfloat16())
    ref_pos, ref_neg = nulsq_step_grads_eq10_12(x.double(), pos.double(), neg.double())
    torch.testing.assert_close(dpos.double(), 0.5 * ref_pos @ dy.double(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dneg.double(), 0.5 * ref_neg @ dy.double(), atol=1e-4, rtol=1e-5)

    step = torch.tensor(0.3)
    y, dx, dstep = run_lsq(x, step, qn, qp, dy)
    y32, _, _ = run_lsq(x.float(), step, qn, qp, dy.float())
    assert y.dtype == dx.dtype == torch.bfloat16 and dstep.dtype == torch.float32
    assert torch.equal(y, y32.bfloat16())
    ref = (lsq_step_grad_eq4(x.double(), 0.3, qn, qp) * dy.double()).sum()
    torch.testing.assert_close(dstep.double(), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    "layout",
    ["transposed", "channels_last", "strided"],
)
def test_any_shape_and_layout(layout: str) -> None:
    gen = torch.Generator().manual_seed(3)
    pos, neg = random_steps(3, gen), random_steps(4, gen)
    base = torch.randn(4, 5, 6, 7, generator=gen)
    x = {
        "transposed": base.transpose(0, 2),
        "channels_last": base.to(memory_format=torch.channels_last),
        "strided": base[:, ::2, :, 1:],
    }[layout]
    dy = torch.randn(x.shape, generator=gen)  # contiguous: another layout than x
    y, dx, dpos, dneg = run_nulsq(x, pos, neg, dy)
    y1, dx1, dpos1, dneg1 = run_nulsq(x.reshape(-1), pos, neg, dy.reshape(-1))
    assert y.shape == dx.shape == x.shape
    if layout != "strided":  # outputs keep a dense input's memory layout
        assert y.stride() == x.stride() and dx.stride() == x.stride()
    assert torch.equal(y.reshape(-1), y1) and torch.equal(dx.reshape(-1), dx1)
    torch.testing.assert_close(dpos, dpos1)
    torch.testing.assert_close(dneg, dneg1)


def test_only_x_and_steps_are_saved() -> None:
    """No int64 index tensors are kept between forward and backward."""
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    x = torch.randn(100, requires_grad=True)
    pos = torch.full((3,), 0.5, requires_grad=True)
    neg = torch.full((4,), 0.5, requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (F.nulsq(x, pos, neg) + F.lsq(x, step, 4, 3)).sum().backward()
    assert saved and all(dtype == torch.float32 for dtype in saved)


def test_fast_path_dispatch() -> None:
    calls: list[str] = []

    def forward(x, pos, neg):
        calls.append("forward")
        return F.nulsq_forward_reference(x, pos, neg)

    def backward(*args):
        calls.append("backward")
        return F.nulsq_backward_reference(*args)

    previous = F.register_fast_path("nulsq", "cpu", F.Kernel(forward, backward))
    try:
        run_nulsq(torch.randn(10), torch.full((3,), 0.5), None, torch.ones(10))
    finally:
        assert F.register_fast_path("nulsq", "cpu", previous) == F.Kernel(forward, backward)
    assert calls == ["forward", "backward"]
    run_nulsq(torch.randn(10), torch.full((3,), 0.5), None, torch.ones(10))
    assert calls == ["forward", "backward"]  # the test's kernel is gone again
    with pytest.raises(ValueError, match="valid: lsq, nulsq"):
        F.register_fast_path("lcq", "cpu", None)


@pytest.mark.slow  # a cold inductor compile: about 15 s warm, up to a minute cold on 2 loaded cores
@pytest.mark.timeout(180)
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's inductor backend needs a C++ compiler on CPU",
)
def test_torch_compile_matches_eager() -> None:
    gen = torch.Generator().manual_seed(11)
    pos, neg, pos2 = random_steps(3, gen), random_steps(4, gen), random_steps(3, gen)
    x = torch.randn(2, 64, generator=gen)
    dy = torch.randn(2, 64, generator=gen)

    def fn(x, pos, neg, pos2, step):
        # 3-bit signed (bucketize path), 2-bit unsigned (sum of steps), LSQ
        return F.nulsq(x, pos, neg, 0.5) + F.nulsq(x, pos2) + F.lsq(x, step, 4, 3, 0.25)

    compiled = torch.compile(fn, backend="inductor")
    results = []
    for f in (fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, pos, neg, pos2, torch.tensor(0.3))]
        y = f(*leaves)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, atol=1e-5, rtol=1e-5)
