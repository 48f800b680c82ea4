"""The rival quantizers (PACT, APoT, LCQ + ternary, DoReFa, LQ-Nets) against float64 references.

Every reference below is written from the method's own paper (numpy, float64), never by calling the
code under test. Gradients of the STE-based quantizers are checked in one of two ways: a closed form
from the paper (PACT, APoT's RCF, uniform LCQ), or central differences of the paper's forward
formula with the rounding residual held fixed (LCQ's "STE on the rounding only", DoReFa).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import nulsq.quant.rivals  # noqa: F401  (registers the kinds)
from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS, quantizer_parameters

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quantizer"
RNG = np.random.default_rng(0)


def make(kind: str, bits: int, signed: bool, role: str, **args) -> nn.Module:
    """A quantizer in float64, its learnable clip (if any) set by `alpha`."""
    alpha = args.pop("alpha", None)
    q = QUANTIZERS.get(kind)(bits=bits, signed=signed, role=role, **args).double()
    if alpha is not None:
        with torch.no_grad():
            q.alpha.fill_(alpha)
    return q


def run(q: nn.Module, x: np.ndarray, g: np.ndarray):
    """y, dL/dx and {param name: dL/dparam} for L = sum(g * q(x))."""
    xt = torch.tensor(x, requires_grad=True)
    y = q(xt)
    (y * torch.tensor(g)).sum().backward()
    grads = {n: p.grad.detach().numpy().copy() for n, p in q.named_parameters()}
    return y.detach().numpy(), xt.grad.numpy(), grads


def steps_per_side(bits: int, signed: bool) -> int:
    """Uniform steps of a symmetric grid's positive side (2^(b-1) - 1) or an unsigned one (2^b - 1)."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


def central_diff(f, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """d f / d z for a scalar function f of an array z, entry by entry."""
    grad = np.zeros_like(z)
    for i in np.ndindex(z.shape):
        zp, zm = z.copy(), z.copy()
        zp[i] += h
        zm[i] -= h
        grad[i] = (f(zp) - f(zm)) / (2 * h)
    return grad


# -- PACT (Choi et al. Eqs. 1-3) ----------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_pact_forward_and_gradients(bits, signed):
    a = 1.7
    steps = steps_per_side(bits, signed)
    x = RNG.uniform(-3, 3, size=400)
    g = RNG.normal(size=400)
    low = -a if signed else 0.0
    y_ref = np.round(np.clip(x, low, a) * steps / a) * a / steps
    dx_ref = ((x > low) & (x < a)).astype(float)
    da_ref = (x >= a).astype(float) - ((x <= -a) if signed else 0.0)

    y, dx, grads = run(make("pact", bits, signed, "act", alpha=a), x, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dx, g * dx_ref, atol=1e-12)
    np.testing.assert_allclose(grads["alpha"], np.sum(g * da_ref), rtol=1e-10)


def test_pact_lsq_grad_scale_scales_alpha_only():
    x = RNG.uniform(-1, 3, size=(4, 50))
    g = RNG.normal(size=(4, 50))
    _, dx1, g1 = run(make("pact", 2, False, "act", alpha=1.0), x, g)
    _, dx2, g2 = run(make("pact", 2, False, "act", alpha=1.0, grad_scale="lsq"), x, g)
    np.testing.assert_allclose(dx2, dx1)
    np.testing.assert_allclose(g2["alpha"], g1["alpha"] / np.sqrt(50 * 3), rtol=1e-12)


# -- APoT (Li et al.: additive PoT levels, RCF) --------------------------------------------------
def apot_paper_levels(b: int) -> list[float]:
    """Q^a with base bit-width k=2, n=b/2 terms, p_i in {0, 2^-i, 2^-(i+n), 2^-(i+2n)}, max 1."""
    n = b // 2
    terms = [[0.0] + [2.0 ** -(i + j * n) for j in range(3)] for i in range(n)]
    sums = sorted({sum(c) for c in itertools.product(*terms)})
    return [s / sums[-1] for s in sums]


APOT_UNSIGNED = {
    2: [0.0, 0.25, 0.5, 1.0],
    3: [0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0],  # APoT's odd-bit set: {1/2,1/4,1/16} + {1/8}
    4: apot_paper_levels(4),
}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_apot_level_sets(bits):
    unsigned = make("apot", bits, False, "act", alpha=1.0).levels().numpy()
    np.testing.assert_allclose(unsigned, APOT_UNSIGNED[bits], atol=1e-7)
    assert len(unsigned) == 2**bits
    # Weights: sign + (b-1) magnitude bits; 2-bit weights are ternary.
    signed = make("apot", bits, True, "weight", alpha=1.0).levels().numpy()
    mags = [0.0, 1.0] if bits == 2 else APOT_UNSIGNED[bits - 1]
    np.testing.assert_allclose(signed, sorted({s * m for m in mags for s in (-1, 1)}), atol=1e-7)


def test_apot_level_counts_and_paper_sets_5_6_bits():
    np.testing.assert_allclose(make("apot", 6, False, "act").levels(), apot_paper_levels(6), 1e-6)
    assert len(make("apot", 5, False, "act").levels()) == 32
    assert len(make("apot", 6, True, "weight").levels()) == 63


def rcf_ref(x, a, mags, signed, clipped):
    """APoT's RCF: y = a P(clip(x/a)), dy/da = P - x/a inside, P outside; STE for x."""
    mags = np.asarray(mags)
    u = x / a
    low = -1.0 if signed else 0.0
    c = np.clip(u, low, 1.0)
    nearest = mags[np.argmin(np.abs(np.abs(c)[:, None] - mags[None, :]), axis=1)]
    p = np.sign(c) * nearest if signed else nearest
    inside = (u >= low) & (u <= 1.0)
    dx = inside.astype(float) if clipped else np.ones_like(x)
    return a * p, dx, np.where(inside, p - u, p)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("role", ["act", "weight"])
def test_apot_forward_and_rcf_gradients(bits, role):
    signed = role == "weight"
    a = 1.3
    x = RNG.uniform(-2.5, 2.5, size=500)
    g = RNG.normal(size=500)
    mags = ([0.0, 1.0] if bits == 2 else APOT_UNSIGNED[bits - 1]) if signed else APOT_UNSIGNED[bits]
    # APoT's code: clipped STE for activations, unclipped for weights.
    y_ref, dx_ref, da_ref = rcf_ref(x, a, mags, signed, clipped=not signed)
    q = make("apot", bits, signed, role, alpha=a, weight_norm="none")
    y, dx, grads = run(q, x, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dx, g * dx_ref, atol=1e-12)
    # The level table is a float32 buffer (0.1 is not exact there): relative 1e-6, not 1e-12.
    np.testing.assert_allclose(grads["alpha"], np.sum(g * da_ref), rtol=1e-6)


def test_apot_weights_are_standardised_with_constant_statistics():
    w = RNG.normal(0.1, 0.05, size=300)
    g = RNG.normal(size=300)
    mean, std = w.mean(), w.std(ddof=1)
    y_ref, _, da_ref = rcf_ref((w - mean) / std, 1.5, APOT_UNSIGNED[2], True, clipped=False)
    y, dw, grads = run(make("apot", 3, True, "weight", alpha=1.5), w, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)  # output stays in normalised units
    np.testing.assert_allclose(dw, g / std, rtol=1e-10)
    np.testing.assert_allclose(grads["alpha"], np.sum(g * da_ref), rtol=1e-6)


# -- LCQ (Yamamoto: piecewise-linear compander, STE on the rounding only) -------------------------
def lcq_ref(x, a, theta, steps, signed, residual=None):
    """y = sign(x) a g^-1(q(g(min(|x|/a, 1)))) from LCQ's definitions; the rounding residual
    q(u) - u is returned, and held fixed when given (the STE on the rounding only)."""
    K = len(theta)
    widths = np.exp(theta) / np.exp(theta).sum()
    gamma, beta = K * widths, np.concatenate([[0.0], np.cumsum(widths)[:-1]])
    v = np.clip((np.abs(x) if signed else x) / a, 0.0, 1.0)
    k = np.minimum(np.floor(v * K), K - 1).astype(int)
    u = gamma[k] * (v - k / K) + beta[k]
    if residual is None:
        residual = np.round(u * steps) / steps - u
    uq = u + residual
    j = np.searchsorted(beta[1:], uq, side="right")
    y = a * ((uq - beta[j]) / gamma[j] + j / K)
    return (np.sign(x) * y if signed else y), residual


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_lcq_equal_slopes_is_the_uniform_quantizer(bits, signed):
    a = 2.0
    steps = steps_per_side(bits, signed)
    x = RNG.uniform(-3, 3, size=400)
    g = RNG.normal(size=400)
    m = np.abs(x) if signed else x
    sgn = np.sign(x) if signed else 1.0
    inside = (m >= 0) & (m <= a)
    q01 = np.round(np.clip(m / a, 0, 1) * steps) / steps
    y, dx, grads = run(make("lcq", bits, signed, "act", alpha=a), x, g)
    np.testing.assert_allclose(y, sgn * a * q01, atol=1e-12)
    np.testing.assert_allclose(dx, g * inside, atol=1e-9)
    da_ref = sgn * np.where(inside, q01 - m / a, q01)
    np.testing.assert_allclose(grads["alpha"], np.sum(g * da_ref), rtol=1e-9)
    # theta~ = 0 still has a gradient: with the rounding residual r held fixed, a g^-1(g(v) + r)
    # moves with the compander wherever r != 0.
    y_ref, res = lcq_ref(x, a, np.zeros(16), steps, signed)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    theta_ref = central_diff(lambda th: np.sum(g * lcq_ref(x, a, th, steps, signed, res)[0]),
                             np.zeros(16))
    np.testing.assert_allclose(grads["theta"], theta_ref, atol=1e-6)
    levels = make("lcq", bits, signed, "act", alpha=a).levels().numpy()
    uniform = a * np.arange(-steps if signed else 0, steps + 1) / steps
    np.testing.assert_allclose(levels, uniform, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_lcq_learned_compander_forward_and_gradients(bits, signed):
    a, K = 1.6, 16
    steps = steps_per_side(bits, signed)
    theta = RNG.normal(0, 0.5, size=K)
    x = RNG.uniform(-2.2, 2.2, size=60)
    g = RNG.normal(size=60)
    q = make("lcq", bits, signed, "act", alpha=a)
    with torch.no_grad():
        q.theta.copy_(torch.tensor(theta))
    y, dx, grads = run(q, x, g)
    y_ref, res = lcq_ref(x, a, theta, steps, signed)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)

    def loss(a_=a, th=theta):
        return np.sum(g * lcq_ref(x, a_, th, steps, signed, res)[0])

    h = 1e-6  # y is element-wise in x: one central difference for all elements at once
    dx_ref = g * (lcq_ref(x + h, a, theta, steps, signed, res)[0]
                  - lcq_ref(x - h, a, theta, steps, signed, res)[0]) / (2 * h)
    np.testing.assert_allclose(dx, dx_ref, atol=1e-6)
    np.testing.assert_allclose(grads["alpha"], central_diff(lambda z: loss(a_=z[0]), np.array([a])),
                               atol=1e-6)
    np.testing.assert_allclose(grads["theta"], central_diff(lambda th: loss(th=th), theta), atol=1e-6)
    # levels(): a * g^-1(j / L), mirrored when signed; every output is one of them.
    levels = q.levels().numpy()
    assert np.all(np.min(np.abs(y[:, None] - levels[None, :]), axis=1) < 1e-6)
    assert len(levels) == (2 * steps + 1 if signed else steps + 1)


def test_lcq_weights_use_limited_weight_normalisation():
    w = RNG.normal(0.02, 0.1, size=24)
    g = RNG.normal(size=24)
    theta = RNG.normal(0, 0.5, size=16)
    q = make("lcq", 3, True, "weight")
    assert q.alpha.item() == 3.0 and make("lcq", 3, False, "act").alpha.item() == 8.0
    with torch.no_grad():
        q.theta.copy_(torch.tensor(theta))
    y, dw, _ = run(q, w, g)

    def full(w_, res=None):
        std = w_.std(ddof=1)
        yn, res = lcq_ref((w_ - w_.mean()) / std, 3.0, theta, 3, True, res)
        return std * yn, res

    y_ref, res = full(w)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dw, central_diff(lambda z: np.sum(g * full(z, res)[0]), w), atol=1e-6)
    levels = q.levels().numpy()  # in real units after a forward: std * a * g^-1(j/L)
    assert np.all(np.min(np.abs(y[:, None] - levels[None, :]), axis=1) < 1e-6)


@pytest.mark.parametrize("ste", ["clipped", "unclipped"])
def test_ternary_levels_and_gradients(ste):
    s = 0.8
    x = RNG.uniform(-2, 2, size=300)
    g = RNG.normal(size=300)
    q = make("ternary", 2, True, "weight", alpha=s, ste=ste, weight_norm="none")
    np.testing.assert_allclose(q.levels().numpy(), [-s, 0.0, s], atol=1e-12)
    y, dx, grads = run(q, x, g)
    # Written out: y = s round(clip(x/s, -1, 1)); ds = round(x/s) - x/s inside, sign(x) outside.
    inside = np.abs(x) <= s
    r = np.round(np.clip(x / s, -1, 1))
    np.testing.assert_allclose(y, s * r, atol=1e-12)
    np.testing.assert_allclose(dx, g * (inside if ste == "clipped" else 1.0), atol=1e-12)
    np.testing.assert_allclose(grads["alpha"], np.sum(g * np.where(inside, r - x / s, np.sign(x))),
                               rtol=1e-10)


@pytest.mark.parametrize("ste", ["clipped", "unclipped"])
def test_lcq_builds_ternary_2bit_weights_when_asked(ste):
    lcq = make("lcq", 2, True, "weight", ternary_at_2bit=ste)
    ternary = make("ternary", 2, True, "weight", ste=ste)
    assert lcq.theta is None and [p.shape for p in lcq.parameters()] == [torch.Size([])]
    w = RNG.normal(0, 0.1, size=200)
    g = RNG.normal(size=200)
    for a, b in zip(run(lcq, w, g)[:2], run(ternary, w, g)[:2]):
        np.testing.assert_allclose(a, b, atol=1e-12)
    # The same config at 3 bits, or on activations, stays LCQ with companding parameters.
    assert make("lcq", 3, True, "weight", ternary_at_2bit=ste).theta is not None
    assert make("lcq", 2, False, "act", ternary_at_2bit=ste).theta is not None


# -- DoReFa (Zhou et al. Eq. 9 and the activation quantizer) -------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("scale", ["max", "none"])
def test_dorefa_weights(bits, scale):
    n = 2**bits - 1
    w = RNG.normal(0, 0.6, size=12)
    g = RNG.normal(size=12)
    c = np.abs(w).max() if scale == "max" else 1.0

    def ref(w_, res=None):
        t = np.tanh(w_)
        r = t / (2 * np.abs(t).max()) + 0.5
        if res is None:
            res = np.round(r * n) / n - r
        return 2 * (r + res) - 1, res

    y_ref, res = ref(w)
    q = make("dorefa", bits, True, "weight", scale=scale)
    y, dw, grads = run(q, w, g)
    assert grads == {}
    np.testing.assert_allclose(y, c * y_ref, atol=1e-12)
    dw_ref = c * central_diff(lambda z: np.sum(g * ref(z, res)[0]), w)
    np.testing.assert_allclose(dw, dw_ref, atol=1e-6)
    np.testing.assert_allclose(q.levels().numpy(), c * (2 * np.arange(n + 1) / n - 1), atol=1e-7)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [False, True])
def test_dorefa_activations(bits, signed):
    n = 2**bits - 1
    x = RNG.uniform(-1.5, 1.5, size=300)
    g = RNG.normal(size=300)
    if signed:  # [-1, 1] mapped to [0, 1] and back
        y_ref = 2 * np.round((np.clip(x, -1, 1) + 1) / 2 * n) / n - 1
        inside = np.abs(x) <= 1
    else:
        y_ref = np.round(np.clip(x, 0, 1) * n) / n
        inside = (x >= 0) & (x <= 1)
    y, dx, _ = run(make("dorefa", bits, signed, "act"), x, g)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    np.testing.assert_allclose(dx, g * inside, atol=1e-12)


# -- LQ-Nets (Zhang et al.: levels e^T v, QEM) ----------------------------------------------------
def lq_levels_ref(v, signed):
    choices = (-1.0, 1.0) if signed else (0.0, 1.0)
    codes = np.array(list(itertools.product(choices, repeat=len(v))))
    return codes, codes @ np.asarray(v)


@pytest.mark.parametrize("signed", [False, True])
def test_lqnets_levels_forward_and_ste(signed):
    v = [0.3, 0.7, 1.9]
    q = make("lqnets", 3, signed, "weight" if signed else "act").eval()
    q.basis.copy_(torch.tensor(v))
    _, values = lq_levels_ref(v, signed)
    np.testing.assert_allclose(q.levels().numpy(), np.sort(values), atol=1e-12)
    x = RNG.uniform(-4, 4, size=300)
    g = RNG.normal(size=300)
    y, dx, _ = run(q, x, g)
    np.testing.assert_allclose(y, values[np.argmin(np.abs(x[:, None] - values), axis=1)], atol=1e-12)
    np.testing.assert_allclose(dx, g, atol=1e-12)
    np.testing.assert_allclose(q.basis.numpy(), v)  # eval mode: no QEM


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lqnets_qem_step_is_least_squares(signed, momentum):
    v0 = np.array([0.2, 0.5])
    x = RNG.normal(size=2000)
    x = x if signed else np.maximum(x, 0)
    codes, values = lq_levels_ref(v0, signed)
    B = codes[np.argmin(np.abs(x[:, None] - values), axis=1)]  # step 1: nearest codes
    v_star = np.linalg.lstsq(B, x, rcond=None)[0]  # step 2: least-squares basis
    q = make("lqnets", 2, signed, "weight" if signed else "act", momentum=momentum).train()
    q.basis.copy_(torch.tensor(v0))
    q(torch.tensor(x))
    np.testing.assert_allclose(q.basis.numpy(), momentum * v0 + (1 - momentum) * v_star, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("signed", [False, True])
def test_lqnets_fit_reduces_mse_on_gaussian_data(bits, signed):
    x = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = x if signed else x.clamp_min(0)
    # Starts from the uniform basis of LSQ's init step (observed), then 30 training forwards.
    q = make("lqnets", bits, signed, "weight" if signed else "act", init_method="lsq")
    q.begin_init()
    q(x)
    q.end_init()

    def mse() -> float:
        q.eval()
        return float(((q(x) - x) ** 2).mean())

    before = mse()
    q.train()
    for _ in range(30):
        q(x)
    after = mse()
    assert after < 0.98 * before, (before, after)


# -- errors, parameters, training -----------------------------------------------------------------
@pytest.mark.parametrize(
    "kind, bits, args, role",
    [
        ("apot", 7, {}, "act"),
        ("apot", 8, {}, "weight"),
        ("ternary", 3, {}, "weight"),
        ("apot", 4, {"ste": "sometimes"}, "act"),
        ("lcq", 4, {"K": 0}, "act"),
        ("lcq", 2, {"ternary_at_2bit": "half"}, "weight"),
        ("lcq", 4, {"weight_norm": "whiten"}, "weight"),
        ("pact", 4, {"weight_norm": "lwn"}, "act"),
        ("pact", 4, {"clip_init": -1.0}, "act"),
        ("pact", 4, {"clip_init": "max"}, "act"),
        ("pact", 4, {"init_method": "nope", "clip_init": "data"}, "act"),
        ("dorefa", 4, {"scale": "mean"}, "weight"),
        ("lqnets", 4, {"momentum": 1.0}, "act"),
    ],
)
def test_bad_settings_raise_user_error(kind, bits, args, role):
    init = {"init_method": args.pop("init_method")} if "init_method" in args else {}
    with pytest.raises(UserError) as err:
        QUANTIZERS.get(kind)(bits=bits, signed=role == "weight", role=role, **init, **args)
    assert "\n" not in str(err.value)


def test_ternary_refuses_unsigned_input():
    with pytest.raises(UserError, match="signed"):
        QUANTIZERS.get("ternary")(bits=2, signed=False, role="act")


@pytest.mark.parametrize(
    "kind, args, expected",
    [
        ("pact", {}, ["alpha"]),
        ("apot", {}, ["alpha"]),
        ("lcq", {}, ["alpha", "theta"]),
        ("lcq", {"ternary_at_2bit": "clipped"}, ["alpha"]),
        ("ternary", {}, ["alpha"]),
        ("dorefa", {}, []),
        ("lqnets", {}, []),
    ],
)
def test_learnable_parameters_are_found(kind, args, expected):
    q = QUANTIZERS.get(kind)(bits=2, signed=True, role="weight", **args)
    model = nn.Sequential(nn.Linear(2, 2), q)
    found = quantizer_parameters(model)
    assert [id(p) for p in found] == [id(getattr(q, n)) for n in expected]
    if kind == "lqnets":
        assert "1.basis" in model.state_dict()  # a buffer: checkpointed, not optimised


def test_clip_from_data_is_qp_times_the_initialiser_step():
    # init "lsq": s = 2 mean|x| / sqrt(Qp) (docs/maths.md), alpha = Qp s, max over batches.
    batches = [RNG.uniform(0, 1, size=500), RNG.uniform(0, 3, size=500)]
    q = QUANTIZERS.get("pact")(bits=2, signed=False, role="act", init_method="lsq")
    q.begin_init()
    for b in batches:
        q(torch.tensor(b, dtype=torch.float32))
    q.end_init()
    expected = max(3 * 2 * np.abs(b).mean() / np.sqrt(3) for b in batches)
    assert q.alpha.item() == pytest.approx(expected, rel=1e-5)
    # APoT weights measure the standardised weights; LCQ keeps the paper's constants.
    w = RNG.normal(0.3, 0.05, size=400)
    apot = QUANTIZERS.get("apot")(bits=3, signed=True, role="weight", init_method="lsq")
    lcq = QUANTIZERS.get("lcq")(bits=3, signed=True, role="weight", init_method="lsq")
    for q in (apot, lcq):
        q.begin_init()
        q(torch.tensor(w, dtype=torch.float32))
        q.end_init()
    wn = (w - w.mean()) / w.std(ddof=1)
    assert apot.alpha.item() == pytest.approx(3 * 2 * np.abs(wn).mean() / np.sqrt(3), rel=1e-4)
    assert lcq.alpha.item() == 3.0


class _QLinear(nn.Linear):
    def __init__(self, n_in: int, n_out: int, wq: nn.Module, aq: nn.Module) -> None:
        super().__init__(n_in, n_out)
        self.wq, self.aq = wq, aq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.aq(x), self.wq(self.weight), self.bias)


RIVAL_CONFIGS = ["lcq", "lcq_apot_type", "pact", "apot", "dorefa", "lqnets"]


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("config", RIVAL_CONFIGS)
def test_tiny_network_trains_two_sgd_steps(config, bits):
    cfg = yaml.safe_load((CONFIGS / f"{config}.yaml").read_text())
    assert cfg["name"] == config

    def quantizer(role: str, signed: bool) -> nn.Module:
        spec = cfg[role]
        return QUANTIZERS.get(spec["kind"])(
            bits=bits, signed=signed, role=role, init_method="lsq", **spec["args"]
        )

    torch.manual_seed(0)
    model = nn.Sequential(
        _QLinear(8, 16, quantizer("weight", True), quantizer("act", True)),
        nn.ReLU(),
        _QLinear(16, 4, quantizer("weight", True), quantizer("act", False)),
    )
    x, target = torch.randn(32, 8), torch.randint(0, 4, (32,))
    qs = [m for m in model.modules() if hasattr(m, "observing")]
    for q in qs:
        q.begin_init()
    with torch.no_grad():
        model(x)
    for q in qs:
        q.end_init()
    quant_params = quantizer_parameters(model)
    ids = {id(p) for p in quant_params}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights}] + ([{"params": quant_params, "lr": 0.01}] if quant_params else [])
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    for _ in range(2):
        loss = nn.functional.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in quant_params)
