"""Step-size initialisers and the MSE-optimal Gaussian steps behind them."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.integrate import quad
from scipy.stats import norm

from nulsq.errors import UserError
from nulsq.quant import init
from nulsq.quant.base import signed_range


@pytest.mark.parametrize("levels, expected", [(4, 0.9957), (8, 0.5860), (16, 0.3352)])
def test_max_1960_table(levels: int, expected: float) -> None:
    assert init.gaussian_optimal_step(levels) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("qp, expected", [(3, 0.65077), (7, 0.35341), (15, 0.19325)])
def test_relu_gaussian_steps(qp: int, expected: float) -> None:
    assert init.relu_gaussian_optimal_step(qp) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("bits, expected", [(2, 1.0484), (3, 0.6018), (4, 0.3386)])
def test_signed_grid_steps(bits: int, expected: float) -> None:
    step = init.signed_grid_optimal_step(*signed_range(bits, True))
    assert step == pytest.approx(expected, abs=5e-4)


def mse_by_quadrature(step: float, qn: int, qp: int) -> float:
    """E[(z - Q(z))^2], z ~ N(0,1), Q = nearest of {-Qn s..Qp s}, by numerical integration."""

    def integrand(z: float) -> float:
        q = step * min(max(round(z / step), -qn), qp)
        return (z - q) ** 2 * norm.pdf(z)

    breaks = [(k + 0.5) * step for k in range(-qn, qp)]
    return quad(integrand, -12, 12, points=breaks, limit=400)[0]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_signed_optimum_is_a_minimum_of_the_integrated_mse(bits: int) -> None:
    """Independent of the closed forms: the step beats its neighbours under scipy quadrature."""
    qn, qp = signed_range(bits, True)
    s = init.signed_grid_optimal_step(qn, qp)
    best = mse_by_quadrature(s, qn, qp)
    assert best < mse_by_quadrature(s * 0.98, qn, qp)
    assert best < mse_by_quadrature(s * 1.02, qn, qp)


@pytest.mark.parametrize("bits", range(2, 9))
def test_constants_exist_for_every_bit_width(bits: int) -> None:
    qn, qp = signed_range(bits, True)
    _, qp_unsigned = signed_range(bits, False)
    steps = [
        init.gaussian_optimal_step(2**bits),
        init.relu_gaussian_optimal_step(qp_unsigned),
        init.signed_grid_optimal_step(qn, qp),
    ]
    assert all(0 < s < 1.2 and math.isfinite(s) for s in steps)
    if bits > 2:  # more levels, finer steps
        assert init.gaussian_optimal_step(2**bits) < init.gaussian_optimal_step(2 ** (bits - 1))


def gaussian(n: int, sigma: float, seed: int) -> torch.Tensor:
    return sigma * torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_init_recovers_sigma_times_constant(bits: int) -> None:
    sigma = 0.37
    x = gaussian(400_000, sigma, bits)
    qn, qp = signed_range(bits, True)
    step = init.INITS.get("mse")(x, qn, qp, True)
    assert step.item() == pytest.approx(sigma * init.gaussian_optimal_step(2**bits), rel=0.02)
    _, qp_u = signed_range(bits, False)
    step = init.INITS.get("mse")(torch.relu(x), 0, qp_u, False)
    assert step.item() == pytest.approx(sigma * init.relu_gaussian_optimal_step(qp_u), rel=0.02)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_search_finds_the_signed_grid_optimum(bits: int) -> None:
    sigma = 2.5
    x = gaussian(50_000, sigma, 10 + bits)
    qn, qp = signed_range(bits, True)
    step = init.INITS.get("mse_search")(x, qn, qp, True)
    assert step.item() == pytest.approx(sigma * init.signed_grid_optimal_step(qn, qp), rel=0.03)


def test_mse_search_unsigned_after_relu() -> None:
    x = torch.relu(gaussian(50_000, 1.0, 5))
    step = init.INITS.get("mse_search")(x, 0, 7, False)
    assert step.item() == pytest.approx(init.relu_gaussian_optimal_step(7), rel=0.03)


def test_mse_search_subsamples_big_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(init, "_SEARCH_MAX_ELEMENTS", 30_000)
    x = gaussian(70_001, 1.0, 6)
    state = torch.get_rng_state()
    step = init.INITS.get("mse_search")(x, 2, 1, True)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert step.item() == pytest.approx(init.signed_grid_optimal_step(2, 1), rel=0.03)


def test_lsq_init_formula() -> None:
    x = torch.tensor([-2.0, 1.0, 0.5, -0.5])
    assert init.INITS.get("lsq")(x, 4, 3, True).item() == pytest.approx(2 * 1.0 / math.sqrt(3))


@pytest.mark.parametrize("name", ["lsq", "mse", "mse_authors", "mse_search"])
@pytest.mark.parametrize("signed", [True, False])
def test_every_initialiser_returns_a_detached_scalar(name: str, signed: bool) -> None:
    x = gaussian(1000, 1.0, 0).requires_grad_()
    qn, qp = signed_range(3, signed)
    step = init.INITS.get(name)(x if signed else x.relu(), qn, qp, signed)
    assert step.shape == () and step.dtype == torch.float32 and not step.requires_grad
    assert step.item() > 0


def test_registry() -> None:
    assert init.INITS.names() == ["lsq", "mse", "mse_authors", "mse_search"]
    with pytest.raises(UserError, match="valid names: lsq, mse, mse_authors, mse_search"):
        init.INITS.get("minmax")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_the_authors_decimal_constants_sit_near_the_computed_optima(bits, signed) -> None:
    """mse_authors differs from mse only by the authors' rounding of the same optimum (the Gaussian
    integrals computed here): by < 1e-5 relative at 2-5 bits, < 1e-4 at 6-8 bits (flat optima)."""
    x = gaussian(4096, 1.3, bits)
    x = x if signed else x.relu()
    qn, qp = signed_range(bits, signed)
    ours = init.INITS.get("mse")(x, qn, qp, signed).double()
    theirs = init.INITS.get("mse_authors")(x, qn, qp, signed).double()
    assert float(abs(theirs / ours - 1)) < (1e-5 if bits <= 5 else 1e-4)
