"""The quantizer maths: LSQ and nuLSQ fake quantization with their STE gradients.

Two public ops, `lsq` (supplement Eq. 1 and 4) and `nulsq` (supplement Eq. 5 and 10-12, with the
Eq. 13 typo fixed: docs/maths.md writes every equation out), and `scale_grad`. Each of the two
quantizer ops is an autograd Function whose forward and backward call a *kernel*: the plain-torch
reference kernels below, or a fast path registered with `register_fast_path` for a device type
(or for "compile", the path taken while torch.compile traces). The first op call asks the kernel
table (`nulsq.quant.kernels.load_defaults`) for this machine's fast paths, so importing this
module alone never depends on an import order. Fast paths must match the reference kernels, which
the tests check against float64 transcriptions of the equations.

Rules every kernel follows (so that it works under torch.compile and CUDA graphs):
- compute in fp32 whatever the input dtype; return x's dtype for y and dx, the steps' dtype for the
  step gradients;
- no GPU-to-host synchronisation: no `.item()`, no boolean-mask indexing, no Python branching on
  tensor values;
- save only x and the steps for backward (never an int64 index tensor): backward recomputes.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor


class Kernel(NamedTuple):
    """A forward/backward pair implementing one op (see the reference kernels for signatures)."""

    forward: Callable[..., Tensor]
    backward: Callable[..., tuple[Tensor | None, ...]]


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, skipping a no-op `.to`: torch 2.11's dynamo zeroes the gradient of an
    autograd.Function whose forward returns such a no-op cast (seen on CPU and CUDA)."""
    return t if t.dtype == dtype else t.to(dtype)


# -- LSQ: supplement Eq. 1 (forward) and Eq. 4 (step gradient) ----------------------------------


def lsq_forward_reference(x: Tensor, step: Tensor, qn: int, qp: int) -> Tensor:
    """y = s * round(clamp(x/s, -Qn, Qp)), torch.round (half to even, as PyTorch's fake-quant ops).

    Args:
        x: input of any shape, fp32 or bf16.
        step: the step s, 0-d or 1 element.
        qn, qp: the grid is {-Qn s, ..., Qp s}.
    """
    s = step.float().reshape(())
    return cast(torch.round(torch.clamp(x.float() / s, -qn, qp)) * s, x.dtype)


def lsq_backward_reference(
    dy: Tensor,
    x: Tensor,
    step: Tensor,
    qn: int,
    qp: int,
    grad_scale: float,
    need_x: bool = True,
    need_step: bool = True,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients (dx, dstep) of `lsq_forward_reference`.

    dx = dy on the closed interval x/s in [-Qn, Qp], 0 outside. dstep = grad_scale * sum(dy * G)
    with Eq. 4: G = -Qn for x/s <= -Qn, Qp for x/s >= Qp (both clip branches closed, which is what
    makes nuLSQ with equal steps reduce to it exactly), round(x/s) - x/s strictly between.

    Args:
        dy: upstream gradient, shape of x.
        x, step, qn, qp: as in the forward.
        grad_scale: multiplies dstep only.
        need_x, need_step: skip the gradients nobody asked for.
    """
    s = step.float().reshape(())
    xs = x.float() / s
    xc = torch.clamp(xs, -qn, qp)
    dyf = dy.float()
    dx = cast(torch.where(xs == xc, dyf, 0.0), x.dtype) if need_x else None
    dstep = None
    if need_step:
        # In the clipped branches round(xc) is already -Qn or Qp, so G = round(xc) - x/s*[inside].
        strictly_inside = (xs > -qn) & (xs < qp)
        g = torch.round(xc) - torch.where(strictly_inside, xs, 0.0)
        dstep = cast(((dyf * g).sum() * grad_scale).reshape(step.shape), step.dtype)
    return dx, dstep


# -- nuLSQ: supplement Eq. 5 (forward) and Eq. 10-12 (step gradients) ---------------------------


class _MemoryOrder:
    """Views a tensor as 1-D in its own memory order, and maps results back to its layout.

    bucketize needs a contiguous input: this avoids a copy (and keeps y and dx in x's layout) for
    any dense layout, e.g. channels_last activations. Tensors with another layout than x (a dy
    from elsewhere) are copied into x's order.
    """

    def __init__(self, x: Tensor) -> None:
        self.perm = sorted(range(x.dim()), key=x.stride, reverse=True)
        self.inverse = sorted(range(x.dim()), key=self.perm.__getitem__)
        self.shape = [x.shape[d] for d in self.perm]

    def flatten(self, t: Tensor) -> Tensor:
        return t.permute(self.perm).reshape(-1)

    def restore(self, flat: Tensor) -> Tensor:
        return flat.view(self.shape).permute(self.inverse)


class NuGrid(NamedTuple):
    """Lookup tables that classify x into cells with one bucketize (see `nulsq_grid`)."""

    boundaries: Tensor  # (2n+3,) ascending cell edges
    level_of_cell: Tensor  # (2n+4,) the output level of each cell
    dx_of_cell: Tensor  # (2n+4,) 1 where dy/dx = 1 (the closed interval [bottom, top])
    widths: Tensor  # (n,) step of each interval between adjacent levels, ascending order


def nulsq_grid(pos_steps: Tensor, neg_steps: Tensor | None) -> NuGrid:
    """Build the cell tables of the grid from the steps (n = Qn + Qp intervals, fp32).

    With levels L_0 < ... < L_n (L_0 = -c'_Qn, L_Qn = 0, L_n = c_Qp) and the Eq. 5 thresholds
    t_i = midpoint of interval i, `torch.bucketize(x, boundaries)` (= number of edges < x) gives
        0: x < L_0          1: x == L_0           (lower clip; dx = 0 / dx = dy)
        2i: L_{i-1} < x <= t_i  -> L_{i-1}    2i+1: t_i < x <= L_i -> L_i   (interval i = 1..n)
        2n+2: x == L_n      2n+3: x > L_n         (upper clip; dx = dy / dx = 0)
    Ties go to the level nearer zero: on the positive side "edge < x" already sends x == t_i down;
    on the negative side t_i is moved one ulp down so that x == t_i counts as above it. Edges
    "== L_0" and "== L_n" use the ulp below each clip point. Requires positive steps (the
    quantizer guards them): only then are levels and thresholds ascending.
    """
    pos = pos_steps.float().reshape(-1)
    neg = pos.new_zeros(0) if neg_steps is None else neg_steps.float().reshape(-1).flip(0)
    # neg is now s'_Qn, ..., s'_1: the negative intervals in ascending order.
    zero = pos.new_zeros(1)
    # Prefix sums accumulated in float64, then rounded: the same levels on every device and path
    # (torch's CPU cumsum accumulates fp32 in double anyway; its CUDA one would not).
    c_pos = torch.cumsum(pos.double(), 0).float()
    c_neg = torch.cumsum(neg.flip(0).double(), 0).float().flip(0)  # c'_Qn, ..., c'_1
    levels = torch.cat([-c_neg, zero, c_pos])
    # Eq. 5: the step into level n switches on at c_n - s_n/2 (mirrored on the negative side).
    down = torch.full_like(neg, -float("inf"))
    t_neg = torch.nextafter(-(c_neg - neg / 2), down)
    thresholds = torch.cat([t_neg, c_pos - pos / 2])
    below = torch.full_like(zero, -float("inf"))
    bottom, top = levels[:1], levels[-1:]
    inner = torch.stack([thresholds, levels[1:]], dim=1).reshape(-1)[:-1]  # t_1, L_1, ..., t_n
    boundaries = torch.cat(
        [torch.nextafter(bottom, below), bottom, inner, torch.nextafter(top, below), top]
    )
    level_of_cell = torch.cat([bottom, levels.repeat_interleave(2), top])
    dx_of_cell = torch.cat([zero, torch.ones_like(levels).repeat_interleave(2), zero])
    return NuGrid(boundaries, level_of_cell, dx_of_cell, torch.cat([neg, pos]))


# Up to this many thresholds (Qn + Qp), the forward sums step functions (2 bits: 3 thresholds);
# beyond, one bucketize wins (on CPU a bucketize costs several elementwise passes).
_MAX_THRESHOLDS_FOR_STEP_SUM = 4


def nulsq_forward_reference(x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None) -> Tensor:
    """Eq. 5: x to the nearest level (ties toward zero), clipped to [-c'_Qn, c_Qp].

    Args:
        x: input of any shape, fp32 or bf16.
        pos_steps: (Qp,) s_1..s_Qp, counted outward from zero.
        neg_steps: (Qn,) s'_1..s'_Qn, or None for an unsigned grid.
    """
    qn = 0 if neg_steps is None else neg_steps.numel()
    if qn + pos_steps.numel() <= _MAX_THRESHOLDS_FOR_STEP_SUM:
        return cast(_sum_of_steps(x.float(), pos_steps, neg_steps), x.dtype)
    grid = nulsq_grid(pos_steps, neg_steps)
    layout = _MemoryOrder(x)
    cell = torch.bucketize(layout.flatten(x.float()), grid.boundaries)
    return layout.restore(cast(torch.take(grid.level_of_cell, cell), x.dtype))


def _sum_of_steps(xf: Tensor, pos_steps: Tensor, neg_steps: Tensor | None) -> Tensor:
    """Eq. 5 literally: y = sum_n s_n [x > c_n - s_n/2] - sum_n s'_n [x < -(c'_n - s'_n/2)].

    The strict comparisons send ties toward zero. Elementwise, so y keeps x's layout.
    """
    y = torch.zeros_like(xf)
    pos = pos_steps.float().reshape(-1)
    thresholds = torch.cumsum(pos, 0) - pos / 2
    for n in range(pos.numel()):
        y.addcmul_((xf > thresholds[n]).to(xf.dtype), pos[n])
    if neg_steps is not None:
        neg = neg_steps.float().reshape(-1)
        thresholds = -(torch.cumsum(neg, 0) - neg / 2)
        for n in range(neg.numel()):
            y.addcmul_((xf < thresholds[n]).to(xf.dtype), neg[n], value=-1)
    return y


def nulsq_backward_reference(
    dy: Tensor,
    x: Tensor,
    pos_steps: Tensor,
    neg_steps: Tensor | None,
    grad_scale: float,
    need_x: bool = True,
    need_steps: bool = True,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients (dx, dpos, dneg) of `nulsq_forward_reference`, supplement Eq. 10-12.

    dx = dy on the closed interval [-c'_Qn, c_Qp], 0 outside. For x in positive interval k,
    dy/ds_k = round(u) - u, u = (x - c_{k-1})/s_k (Eq. 11); for x in negative interval k,
    dy/ds'_k = round(v) - v, v = (x + c'_{k-1})/s'_k (Eq. 13 with its sum running to k); rounding
    ties toward zero as in the forward. Both equal (y - x)/width, so the interior gradient of an
    interval is sum(dy * (y - x)) over its elements divided by its width. Clip branches, closed:
    dy/ds_k = 1 for every k when x >= c_Qp, dy/ds'_k = -1 for every k when x <= -c'_Qn, so that
    with equal steps the gradients sum to LSQ's Eq. 4 for every x except exact ties
    (x/s = k + 1/2): there LSQ rounds half to even and nuLSQ toward zero, as each authors' op
    does, so value and gradient differ where the even neighbour is the one farther from zero
    (x/s = +-1.5, +-3.5, ...). grad_scale scales dpos, dneg.

    Args:
        dy: upstream gradient, shape of x.
        x, pos_steps, neg_steps: as in the forward.
        grad_scale: multiplies the step gradients only.
        need_x, need_steps: skip the gradients nobody asked for.
    """
    grid = nulsq_grid(pos_steps, neg_steps)
    layout = _MemoryOrder(x)
    xf = layout.flatten(x.float())
    dyf = layout.flatten(dy.float())
    cell = torch.bucketize(xf, grid.boundaries)
    dx = None
    if need_x:
        dx = layout.restore(cast(dyf * torch.take(grid.dx_of_cell, cell), x.dtype))
    if not need_steps:
        return dx, None, None
    num_cells = grid.level_of_cell.numel()
    # One scatter of dy*(y - x) for the interiors, one of dy for the clip branches.
    target, copies = _scatter_targets(cell, num_cells)
    y_minus_x_dy = torch.take(grid.level_of_cell, cell).sub_(xf).mul_(dyf)
    interior = _sum_per_cell(target, copies, y_minus_x_dy, num_cells)
    clipped = _sum_per_cell(target, copies, dyf, num_cells)
    below = None if neg_steps is None else clipped[:2].sum()
    dpos, dneg = nulsq_step_gradients(interior[2:-2].reshape(-1, 2).sum(1), grid.widths,
                                      clipped[-2:].sum(), below, pos_steps, neg_steps, grad_scale)
    return dx, dpos, dneg


def nulsq_step_gradients(
    interior: Tensor,
    widths: Tensor,
    above: Tensor,
    below: Tensor | None,
    pos_steps: Tensor,
    neg_steps: Tensor | None,
    grad_scale: float,
) -> tuple[Tensor, Tensor | None]:
    """(dpos, dneg) from the sums every nuLSQ backward kernel reduces x and dy to (Eq. 10-13).

    Args:
        interior: (N,) sum of dy * (y - x) over each interval's interior, ascending order
            (negative intervals first); divided by the interval's width it is Eq. 11/13's term.
        widths: (N,) the step of each interval, same order.
        above: sum of dy over x >= c_Qp (adds to every s_k, Eq. 10).
        below: sum of dy over x <= -c'_Qn (subtracts from every s'_k, Eq. 12); None if unsigned.
        pos_steps, neg_steps, grad_scale: as in the forward; the results take the steps' shapes
            and dtypes.
    """
    per_interval = interior / widths
    qn = 0 if neg_steps is None else neg_steps.numel()
    dpos = cast(((per_interval[qn:] + above) * grad_scale).reshape(pos_steps.shape),
                 pos_steps.dtype)
    if neg_steps is None:
        return dpos, None
    dneg = (per_interval[:qn].flip(0) - below) * grad_scale
    return dpos, cast(dneg.reshape(neg_steps.shape), neg_steps.dtype)


# On a GPU, thousands of threads adding into the same few bins serialise on atomics (measured on
# an H200, 51M elements into 10 bins: 20 ms); spreading them over 1024 copies of the bins: 2 ms.
GPU_BIN_COPIES = 1024


def _bin_copies(device: torch.device) -> int:
    """How many copies of the bins per-cell sums spread over (a power of two)."""
    return 1 if device.type == "cpu" else GPU_BIN_COPIES


def _scatter_targets(cell: Tensor, num_cells: int) -> tuple[Tensor, int]:
    """Where each element's per-cell sum goes: its cell, in copy (element index mod copies)."""
    copies = _bin_copies(cell.device)
    if copies == 1:
        return cell, 1
    copy = torch.arange(cell.numel(), device=cell.device).bitwise_and_(copies - 1)
    return copy.mul_(num_cells).add_(cell), copies


def _sum_per_cell(target: Tensor, copies: int, values: Tensor, num_cells: int) -> Tensor:
    sums = values.new_zeros(copies * num_cells).scatter_add_(0, target, values)
    return sums.view(copies, num_cells).sum(0)


# -- dispatch: reference kernels unless a fast path is registered for the device type -----------

_REFERENCE: dict[str, Kernel] = {
    "lsq": Kernel(lsq_forward_reference, lsq_backward_reference),
    "nulsq": Kernel(nulsq_forward_reference, nulsq_backward_reference),
}
_FAST_PATHS: dict[tuple[str, str], Kernel] = {}
_fast_paths_loaded = False  # whether the kernel table has been asked (see load_fast_paths)


def load_fast_paths() -> None:
    """Ask the kernel table for this machine's fast paths, once per process: the first op call
    does, as do `kernels.enable()` / `disable()`, so an explicit choice made before is kept."""
    global _fast_paths_loaded
    if _fast_paths_loaded:
        return
    _fast_paths_loaded = True
    from nulsq.quant import kernels  # here, not at the top: kernels import this module

    kernels.load_defaults()


def register_fast_path(op: str, device_type: str, kernel: Kernel | None) -> Kernel | None:
    """Route `op` ("lsq" or "nulsq") on `device_type` ("cuda", "cpu") to `kernel`; None removes it.

    Args:
        op: which op the kernel implements; it must take the reference kernels' arguments.
        device_type: the device type of x it serves ("cuda", "cpu"), or "compile" for the path
            taken while torch.compile traces, whatever the device.
        kernel: the forward/backward pair, or None to fall back to the reference again.

    Returns:
        The fast path registered before (None if there was none), so a caller can restore it.
    """
    if op not in _REFERENCE:
        raise ValueError(f"unknown op '{op}'; valid: {', '.join(sorted(_REFERENCE))}")
    previous = _FAST_PATHS.pop((op, device_type), None)
    if kernel is not None:
        _FAST_PATHS[(op, device_type)] = kernel
    return previous


def _kernel(op: str, x: Tensor) -> Kernel:
    if not _fast_paths_loaded:
        load_fast_paths()
    if torch.compiler.is_compiling():
        # While torch.compile traces, a path registered for the pseudo device type "compile"
        # (code inductor can fuse with the layers around it) wins over the device's own.
        kernel = _FAST_PATHS.get((op, "compile"))
        if kernel is not None:
            return kernel
    return _FAST_PATHS.get((op, x.device.type), _REFERENCE[op])


class _LSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        return _kernel("lsq", x).forward(x, step, qn, qp)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, step = ctx.saved_tensors
        need_x, need_step = ctx.needs_input_grad[:2]
        dx, dstep = _kernel("lsq", x).backward(
            dy, x, step, ctx.qn, ctx.qp, ctx.grad_scale, need_x, need_step
        )
        return dx, dstep, None, None, None


class _NuLSQFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None, grad_scale: float
    ) -> Tensor:
        ctx.save_for_backward(x, pos_steps, neg_steps)
        ctx.grad_scale = grad_scale
        return _kernel("nulsq", x).forward(x, pos_steps, neg_steps)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, pos_steps, neg_steps = ctx.saved_tensors
        need_x, need_pos, need_neg = ctx.needs_input_grad[:3]
        dx, dpos, dneg = _kernel("nulsq", x).backward(
            dy, x, pos_steps, neg_steps, ctx.grad_scale, need_x, need_pos or need_neg
        )
        return dx, dpos, dneg, None


def lsq(x: Tensor, step: Tensor, qn: int, qp: int, grad_scale: float = 1.0) -> Tensor:
    """LSQ fake quantization (Esser et al.; supplement Eq. 1 and 4).

    Forward y = s * round(clamp(x/s, -Qn, Qp)). Backward: dx = dy on [-Qn s, Qp s] (closed);
    ds = grad_scale * sum(dy * G), G = -Qn for x/s <= -Qn, Qp for x/s >= Qp, round(x/s) - x/s
    between.

    Args:
        x: any shape, fp32 or bf16, CPU or CUDA; y has x's dtype.
        step: the learnable step s, a 0-d or 1-element tensor (its gradient has its dtype).
        qn, qp: the grid {-Qn s, ..., Qp s} (see `nulsq.quant.base.signed_range`).
        grad_scale: multiplies the step's gradient only (LSQ's g = 1/sqrt(N Qp), or 1).
    """
    return _LSQFunction.apply(x, step, int(qn), int(qp), float(grad_scale))


def nulsq(
    x: Tensor, pos_steps: Tensor, neg_steps: Tensor | None = None, grad_scale: float = 1.0
) -> Tensor:
    """nuLSQ fake quantization with learnable non-uniform steps (supplement Eq. 5, 10-12).

    Levels c_n = s_1 + ... + s_n above zero and -c'_n below; x goes to the nearest level, the
    threshold between levels n-1 and n being c_n - s_n/2 (Eq. 5), ties to the level nearer zero;
    clipped to [-c'_Qn, c_Qp]. With equal steps s it equals `lsq` except at exact ties
    x/s = k + 1/2, which `lsq` rounds half to even. Gradients: see `nulsq_backward_reference`
    (closed clip branches: x >= c_Qp gives dy/ds_k = 1 for all k, x <= -c'_Qn gives
    dy/ds'_k = -1 for all k; dx = dy on the closed interval [-c'_Qn, c_Qp]). Steps must be
    positive.

    Args:
        x: any shape, fp32 or bf16, CPU or CUDA; y has x's dtype.
        pos_steps: (Qp,) s_1..s_Qp, counted outward from zero.
        neg_steps: (Qn,) s'_1..s'_Qn counted outward from zero, or None for an unsigned grid.
        grad_scale: multiplies the step gradients only.
    """
    return _NuLSQFunction.apply(x, pos_steps, neg_steps, float(grad_scale))


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_grad(t: Tensor, scale: float) -> Tensor:
    """t unchanged (bit for bit) in the forward pass; `scale` times its gradient in the backward.

    Used where one op's step gradients need different scales (symmetric nuLSQ under
    grad_scale "authors"); `t - t*g + t*g` would move t by an ulp.
    """
    if scale == 1.0:
        return t
    return _ScaleGrad.apply(t, float(scale))
