"""Step-size initialisers: a tensor's statistics -> the initial uniform step (docs/maths.md).

Each initialiser is registered in `INITS` under the name a config uses (`init.method`) and has the
signature `fn(x, qn, qp, signed) -> Tensor` (a 0-d fp32 step without grad), for the grid
{-Qn s, ..., Qp s}. The quantizer calls it once per observed batch and keeps the maximum.

- `lsq`: Esser et al.'s 2 mean|x| / sqrt(Qp).
- `mse`: as the authors' code (after UniQ, Pham et al. 2021): a statistic of x times the MSE-optimal
  step of a unit Gaussian with the same number of levels. The constants are computed here from
  closed-form Gaussian integrals, never pasted.
- `mse_search`: the step minimising the quantisation MSE of the observed data itself.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.special import ndtr
from torch import Tensor

from nulsq.registry import Registry

Initialiser = Callable[[Tensor, int, int, bool], Tensor]
INITS: Registry[Initialiser] = Registry("step initialiser")


# -- MSE-optimal steps of a unit Gaussian ---------------------------------------------------------


def _gaussian_quantization_mse(levels: np.ndarray, lower: float = -math.inf) -> float:
    """E[(z - Q(z))^2 ; z > lower] for z ~ N(0, 1), Q = nearest of the ascending `levels`.

    Uses, per decision interval [a, b] with output y,
    int_a^b (z - y)^2 phi(z) dz
        = (1 + y^2)(Phi(b) - Phi(a)) - 2y(phi(a) - phi(b)) + a phi(a) - b phi(b).
    """
    edges = np.concatenate([[lower], (levels[1:] + levels[:-1]) / 2, [math.inf]])
    a, b = edges[:-1], edges[1:]
    phi_a, phi_b = _pdf(a), _pdf(b)
    mass = ndtr(b) - ndtr(a)
    # a*phi(a) -> 0 as a -> +-inf; zero the infinite ends first so inf*0 never appears.
    a_phi_a = np.where(np.isfinite(a), a, 0.0) * phi_a
    b_phi_b = np.where(np.isfinite(b), b, 0.0) * phi_b
    y = levels
    return float(np.sum((1 + y**2) * mass - 2 * y * (phi_a - phi_b) + a_phi_a - b_phi_b))


def _pdf(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.exp(-0.5 * np.square(z)) / math.sqrt(2 * math.pi)


def _argmin_step(mse_of_step: Callable[[float], float]) -> float:
    """The step minimising `mse_of_step`: a log-spaced scan, then Brent between its neighbours."""
    candidates = np.geomspace(1e-3, 4.0, 400)
    best = int(np.argmin([mse_of_step(s) for s in candidates]))
    lo, hi = candidates[max(best - 1, 0)], candidates[min(best + 1, len(candidates) - 1)]
    result = minimize_scalar(
        mse_of_step, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
    )
    return float(result.x)


@lru_cache(maxsize=None)
def gaussian_optimal_step(num_levels: int) -> float:
    """Max's (1960) optimal step of a symmetric mid-rise uniform quantizer of N(0, 1).

    Levels at +-d/2, +-3d/2, ..., +-(N-1)d/2 (0.9957 for 4 levels, 0.5860 for 8, 0.3352 for 16).

    Args:
        num_levels: N, the number of output levels (2^b for b bits).
    """
    offsets = np.arange(num_levels) - (num_levels - 1) / 2
    return _argmin_step(lambda d: _gaussian_quantization_mse(offsets * d))


@lru_cache(maxsize=None)
def relu_gaussian_optimal_step(qp: int) -> float:
    """The MSE-optimal step for ReLU(z), z ~ N(0, 1), on the grid {0, s, ..., Qp s}.

    z <= 0 maps to the level 0 without error, so only z > 0 contributes (0.65077 for Qp = 3).

    Args:
        qp: Qp, the number of positive levels (2^b - 1 for an unsigned b-bit grid).
    """
    multiples = np.arange(qp + 1, dtype=float)
    return _argmin_step(lambda s: _gaussian_quantization_mse(multiples * s, lower=0.0))


@lru_cache(maxsize=None)
def signed_grid_optimal_step(qn: int, qp: int) -> float:
    """The MSE-optimal step of N(0, 1) on the signed grid {-Qn s, ..., Qp s} (1.0484 for 2 bits).

    Args:
        qn, qp: the grid's negative and positive level counts.
    """
    multiples = np.arange(-qn, qp + 1, dtype=float)
    return _argmin_step(lambda s: _gaussian_quantization_mse(multiples * s))


# -- the initialisers -----------------------------------------------------------------------------


@INITS.register("lsq")
@torch.no_grad()
def lsq_init(x: Tensor, qn: int, qp: int, signed: bool) -> Tensor:
    """LSQ's init, 2 mean|x| / sqrt(Qp) (Esser et al. 2020).

    Args:
        x: the observed tensor (weights or one batch of activations).
        qn, qp: the grid's level counts.
        signed: unused; the same statistic serves both grids.
    """
    return (2 * x.detach().float().abs().mean() / math.sqrt(qp)).reshape(())


@INITS.register("mse")
@torch.no_grad()
def mse_init(x: Tensor, qn: int, qp: int, signed: bool) -> Tensor:
    """Statistic of x times the MSE-optimal step of a unit Gaussian, as the authors' code does.

    Signed: std(x) times Max's mid-rise optimum for Qn + Qp + 1 levels (the authors apply it to
    their signed grid as is). Unsigned (after ReLU): sqrt(2 mean(x^2)), which recovers the sigma of
    the Gaussian before the ReLU, times the ReLU-Gaussian optimum for Qp.

    Args:
        x: the observed tensor.
        qn, qp: the grid's level counts.
        signed: which statistic and constant to use.
    """
    xf = x.detach().float()
    if signed:
        return (xf.std() * gaussian_optimal_step(qn + qp + 1)).reshape(())
    return (torch.sqrt(2 * xf.square().mean()) * relu_gaussian_optimal_step(qp)).reshape(())


# The authors' code writes the same constants as decimals keyed by Qp. They sit up to 5e-6
# (relative) from the optima computed above at 2-5 bits (e.g. ReLU-Gaussian, Qp = 7: 0.35340955
# there, 0.35341132 here) and up to 8e-5 at 6-8 bits, where the MSE is flat around its optimum:
# harmless for accuracy, but enough to flip a few roundings of the init batches, so a
# step-by-step comparison with their code (scripts/compare_with_authors.py) takes them.
_AUTHORS_SIGNED = {1: 0.9956866859435065, 3: 0.5860194414434872, 7: 0.33520061219993685,
                   15: 0.18813879027991698, 31: 0.10406300944201481, 63: 0.05686767238235839,
                   127: 0.03076238758025524}
_AUTHORS_UNSIGNED = {3: 0.65076985, 7: 0.35340955, 15: 0.19324868, 31: 0.10548752, 63: 0.0572659,
                     127: 0.03087133, 255: 0.01652923}


@INITS.register("mse_authors")
@torch.no_grad()
def mse_authors_init(x: Tensor, qn: int, qp: int, signed: bool) -> Tensor:
    """`mse` with the authors' decimal constants (keyed by Qp) instead of the computed optima;
    grids the authors' tables lack (e.g. signed activations' Qn != Qp + 1) take the computed ones.

    Args:
        x: the observed tensor.
        qn, qp: the grid's level counts.
        signed: which statistic and table to use.
    """
    table = _AUTHORS_SIGNED if signed else _AUTHORS_UNSIGNED
    if qp not in table or (signed and qn != qp + 1):
        return mse_init(x, qn, qp, signed)
    xf = x.detach().float()
    stat = xf.std() if signed else torch.sqrt(2 * xf.square().mean())
    return (stat * table[qp]).reshape(())


# A direct search evaluates every candidate on the data: bound the work on big activation batches.
_SEARCH_MAX_ELEMENTS = 1 << 18
_COARSE_CANDIDATES = 40
_REFINE_ITERATIONS = 24
_GOLDEN = (math.sqrt(5) - 1) / 2


def _uniform_quantization_mse(x: Tensor, steps: Tensor, qn: int, qp: int) -> Tensor:
    """mean((s round(clamp(x/s, -Qn, Qp)) - x)^2) for each step in `steps` (shape (C,))."""
    errors = []
    for s in steps.split(8):  # 8 candidates at a time bound the (C, N) temporary
        error = torch.div(x, s[:, None]).clamp_(-qn, qp).round_().mul_(s[:, None]).sub_(x)
        errors.append(error.square_().mean(dim=1))
    return torch.cat(errors)


def _subsample(x: Tensor) -> Tensor:
    """At most _SEARCH_MAX_ELEMENTS elements, drawn with a private generator (global RNG kept)."""
    if x.numel() <= _SEARCH_MAX_ELEMENTS:
        return x
    generator = torch.Generator(device=x.device).manual_seed(0)
    index = torch.randint(x.numel(), (_SEARCH_MAX_ELEMENTS,), generator=generator, device=x.device)
    return x[index]


@INITS.register("mse_search")
@torch.no_grad()
def mse_search_init(x: Tensor, qn: int, qp: int, signed: bool) -> Tensor:
    """The step minimising the data's quantisation MSE on the uniform grid {-Qn s, ..., Qp s}.

    A log-spaced grid of candidates from 1/1000 of up to the step whose grid just covers max|x|
    (log spacing copes with outliers), then golden-section refinement between the best
    candidate's neighbours. Everything stays on x's device: no host synchronisation.

    Args:
        x: the observed tensor (a random subset of 2^18 elements is used when it is larger).
        qn, qp: the grid's level counts.
        signed: unused; the grid itself (Qn = 0 or not) says what is representable.
    """
    xf = _subsample(x.detach().float().reshape(-1))
    narrow_side = min(qn, qp) if qn > 0 else qp
    largest = (xf.abs().max() / max(narrow_side, 1)).clamp_min(1e-8)
    coarse = largest * torch.logspace(-3, 0, _COARSE_CANDIDATES, device=xf.device)
    best = torch.argmin(_uniform_quantization_mse(xf, coarse, qn, qp)).reshape(1)
    # gather, not coarse[tensor]: indexing with a 0-d tensor would read it on the host.
    lo = coarse.gather(0, (best - 1).clamp_min(0))[0]
    hi = coarse.gather(0, (best + 1).clamp_max(_COARSE_CANDIDATES - 1))[0]
    for _ in range(_REFINE_ITERATIONS):
        inner = torch.stack([hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)])
        errors = _uniform_quantization_mse(xf, inner, qn, qp)
        left = errors[0] < errors[1]  # the minimum lies in [lo, inner[1]]
        lo, hi = torch.where(left, lo, inner[0]), torch.where(left, inner[1], hi)
    return ((lo + hi) / 2).reshape(())
