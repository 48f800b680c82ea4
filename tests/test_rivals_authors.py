"""The rivals' switches that follow the authors' / official code (issue #12 item 4), on small float64
cases whose expected gradients are written out from what that code computes (docs/fidelity.md,
"Rival quantizers"):

- LCQ `grad: authors`: dy/dx = 1 for |x| < alpha, dy/dalpha = (y - x)/alpha inside, sign(x) outside;
  the companding parameters' gradient is the one through the compander in both modes.
- `grad_scale: authors`: alpha (and LCQ's theta) gradients times sqrt(Qp / N), N = channels of an
  activation, elements of a weight.
- APoT `ste: authors`: weight gradient clipped at 3 bits and more, unclipped at 2 bits.
- LQ-Nets: activation STE zero above the top level; per-output-channel weight bases.
- `init.reduce: mean` for the clip quantizers and LQ-Nets.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nulsq.quant.rivals  # noqa: F401  (registers the kinds)
from nulsq.errors import UserError
from nulsq.quant.base import QUANTIZERS


def make(kind: str, bits: int, signed: bool, role: str, alpha: float | None = None, **args):
    q = QUANTIZERS.get(kind)(bits=bits, signed=signed, role=role, **args).double()
    if alpha is not None:
        with torch.no_grad():
            q.alpha.fill_(alpha)
    return q


def run(q, x: np.ndarray, g: np.ndarray):
    xt = torch.tensor(x, requires_grad=True)
    y = q(xt)
    (y * torch.tensor(g)).sum().backward()
    return (y.detach().numpy(), xt.grad.numpy(),
            {n: p.grad.detach().numpy().copy() for n, p in q.named_parameters()})


def lcq_forward(x, a, theta, steps, signed):
    """LCQ's y = sign(x) a g^-1(round(L g(v)) / L), v = min(|x|/a, 1), written from its paper."""
    K = len(theta)
    w = np.exp(theta) / np.exp(theta).sum()
    gamma, beta = K * w, np.concatenate([[0.0], np.cumsum(w)[:-1]])
    v = np.clip((np.abs(x) if signed else x) / a, 0.0, 1.0)
    k = np.minimum(np.floor(v * K), K - 1).astype(int)
    q = np.round((gamma[k] * (v - k / K) + beta[k]) * steps) / steps
    j = np.searchsorted(beta[1:], q, side="right")
    y = a * ((q - beta[j]) / gamma[j] + j / K)
    return np.sign(x) * y if signed else y


# -- LCQ -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [False, True])
def test_lcq_authors_ste_passes_x_straight_and_alpha_as_their_code(signed):
    a, bits = 1.5, 3
    steps = 3 if signed else 7
    theta = np.array([0.4, -0.3, 0.2, 0.0] * 4)
    x = np.array([-2.0, -1.2, -0.31, 0.05, 0.4, 0.77, 1.1, 1.49, 1.51, 3.0])
    x = x if signed else np.abs(x)
    g = np.array([0.3, -1.0, 0.5, 2.0, -0.7, 1.2, 0.9, -0.4, 0.6, 1.5])
    q = make("lcq", bits, signed, "act", alpha=a)  # grad: authors is the default
    with torch.no_grad():
        q.theta.copy_(torch.tensor(theta))
    y, dx, grads = run(q, x, g)
    y_ref = lcq_forward(x, a, theta, steps, signed)
    np.testing.assert_allclose(y, y_ref, atol=1e-12)
    inside = np.abs(x) < a
    np.testing.assert_allclose(dx, g * inside, atol=1e-12)  # no gamma_k / gamma_j factor
    # the authors' dz/dalpha = z/alpha - x/alpha * [|x| < alpha]
    np.testing.assert_allclose(grads["alpha"], np.sum(g * (y_ref / a - x / a * inside)), rtol=1e-12)
    # theta: the same gradient through the compander as grad=compander
    other = make("lcq", bits, signed, "act", alpha=a, grad="compander")
    with torch.no_grad():
        other.theta.copy_(torch.tensor(theta))
    _, dx_c, grads_c = run(other, x, g)
    np.testing.assert_allclose(grads["theta"], grads_c["theta"], rtol=1e-10, atol=1e-12)
    assert not np.allclose(dx, dx_c)  # the modes differ once theta != 0


def test_authors_grad_scale_is_sqrt_qp_over_n():
    gen = np.random.default_rng(3)
    x = np.abs(gen.normal(size=(2, 3, 4)))  # an activation: N = 3 channels
    g = gen.normal(size=(2, 3, 4))
    theta = gen.normal(0, 0.3, size=16)

    def lcq(mode):
        q = make("lcq", 3, False, "act", alpha=1.2, grad_scale=mode)
        with torch.no_grad():
            q.theta.copy_(torch.tensor(theta))
        return run(q, x, g)

    (_, dx0, g0), (_, dx1, g1) = lcq("none"), lcq("authors")
    factor = math.sqrt(7 / 3)  # Qp = 7, N = 3 channels
    np.testing.assert_allclose(dx1, dx0)
    np.testing.assert_allclose(g1["alpha"], factor * g0["alpha"], rtol=1e-12)
    np.testing.assert_allclose(g1["theta"], factor * g0["theta"], rtol=1e-12, atol=1e-15)
    # a weight: N = its element count; LCQ's 2-bit ternary weights (Qp = 1) and APoT alike
    w = gen.normal(size=(4, 5))
    gw = gen.normal(size=(4, 5))
    for kind, bits, args, qp in [("lcq", 2, {"ternary_at_2bit": "clipped"}, 1),
                                 ("apot", 3, {}, 3), ("ternary", 2, {}, 1)]:
        _, _, h0 = run(make(kind, bits, True, "weight", alpha=1.0, **args), w, gw)
        _, _, h1 = run(make(kind, bits, True, "weight", alpha=1.0, grad_scale="authors", **args), w, gw)
        np.testing.assert_allclose(h1["alpha"], math.sqrt(qp / 20) * h0["alpha"], rtol=1e-12)


# -- APoT ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits, clipped", [(2, False), (3, True), (4, True)])
def test_apot_authors_ste_clips_weights_from_3_bits(bits, clipped):
    x = np.array([-2.5, -0.4, 0.1, 0.9, 1.7])
    g = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    _, dx, _ = run(make("apot", bits, True, "weight", alpha=1.0, weight_norm="none", ste="authors"), x, g)
    np.testing.assert_allclose(dx, [0.0 if clipped else 1.0, 2.0, 3.0, 4.0, 0.0 if clipped else 5.0])
    _, dx_act, _ = run(make("apot", bits, False, "act", alpha=1.0, ste="authors"), np.abs(x), g)
    np.testing.assert_allclose(dx_act, [0.0, 2.0, 3.0, 4.0, 0.0])
    _, dx_default, _ = run(make("apot", bits, True, "weight", alpha=1.0, weight_norm="none"), x, g)
    np.testing.assert_allclose(dx_default, g)  # default: APoT's CIFAR code, unclipped


# -- LQ-Nets ---------------------------------------------------------------------------------------
def test_lqnets_official_activation_ste_is_zero_above_the_top_level():
    q = make("lqnets", 2, False, "act").eval()
    q.basis.copy_(torch.tensor([0.5, 1.0]))  # levels 0, 0.5, 1, 1.5
    x = np.array([-0.3, 0.2, 0.7, 1.5, 1.6, 3.0])
    g = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    y, dx, _ = run(q, x, g)
    np.testing.assert_allclose(y, [0.0, 0.0, 0.5, 1.5, 1.5, 1.5])
    np.testing.assert_allclose(dx, [1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
    w = make("lqnets", 2, True, "weight").eval()  # weights: straight through everywhere
    w.basis.copy_(torch.tensor([0.5, 1.0]))
    np.testing.assert_allclose(run(w, x, g)[1], g)


def test_lqnets_per_channel_bases_fit_each_channel_alone():
    gen = torch.Generator().manual_seed(0)
    scales = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)[:, None, None, None]
    wt = torch.randn(3, 2, 4, 4, generator=gen, dtype=torch.float64) * scales
    q = make("lqnets", 2, True, "weight", per_channel=True, momentum=0.0).train()
    y = q(wt)
    assert q.basis.shape == (3, 2) and q.levels().numel() == 0
    for c in range(3):
        alone = make("lqnets", 2, True, "weight", momentum=0.0).train()
        y_c = alone(wt[c])
        torch.testing.assert_close(q.basis[c], alone.basis, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(y[c], y_c, rtol=1e-9, atol=1e-12)
    fresh = make("lqnets", 2, True, "weight", per_channel=True)
    fresh.load_state_dict(q.state_dict())
    torch.testing.assert_close(fresh.basis, q.basis)


# -- init.reduce -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pact", "apot", "lqnets"])
def test_init_reduce_mean_averages_the_batches(kind):
    batches = [np.full(100, 1.0), np.full(100, 3.0)]
    q = {reduce: QUANTIZERS.get(kind)(bits=2, signed=False, role="act", init_method="lsq",
                                      init_reduce=reduce) for reduce in ("max", "mean")}
    for quantizer in q.values():
        quantizer.begin_init()
        for b in batches:
            quantizer(torch.tensor(b, dtype=torch.float32))
        quantizer.end_init()
    # init "lsq": s = 2 mean|x| / sqrt(Qp), Qp = 3; a clip is Qp s, a basis [s, 2 s]
    steps = [2 * b.mean() / math.sqrt(3) for b in batches]
    got = {r: (quant.basis[0].item() if kind == "lqnets" else quant.alpha.item() / 3)
           for r, quant in q.items()}
    assert got["max"] == pytest.approx(max(steps), rel=1e-6)
    assert got["mean"] == pytest.approx(sum(steps) / 2, rel=1e-6)


# -- bad values ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, role, args, valid", [
    ("lcq", "act", {"grad": "straight"}, "authors, compander"),
    ("apot", "weight", {"ste": "imagenet"}, "default, authors"),
    ("lqnets", "act", {"ste": "clip"}, "default, identity, top"),
    ("lqnets", "act", {"per_channel": True}, "weights only"),
    ("pact", "act", {"grad_scale": "paper"}, "none, lsq, authors"),
])
def test_unknown_switch_values_fail_in_one_line(kind, role, args, valid):
    with pytest.raises(UserError) as err:
        QUANTIZERS.get(kind)(bits=3, signed=role == "weight", role=role, **args)
    assert "\n" not in str(err.value) and valid in str(err.value)
