"""The fast quantizer kernels against the reference kernels of nulsq.quant.functional.

The reference kernels are checked against float64 transcriptions of the supplement's equations in
tests/test_functional.py; here every fast path must give the same y and dx (bit for bit: both
classify x with the same fp32 thresholds) and the same step gradients up to fp32 summation order,
at 2, 3, 4 and 8 bits, signed and unsigned, fp32 and bf16, sizes that are no multiple of a block,
with inputs placed exactly on levels and thresholds. Sections: the CPU C kernels (and the fusable
kernels torch.compile traces, run eagerly); compile (fusion with BN+ReLU); the Triton kernels on
CPU tensors through Triton's interpreter; CUDA (skipped without a GPU, run by
scripts/gpu_check.sh).
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from nulsq.quant import functional as F
from nulsq.quant import kernels
from nulsq.quant.base import signed_range
from nulsq.quant.kernels import cpu_quant, fusable

BITS = (2, 3, 4, 8)
CUDA = torch.cuda.is_available()


# -- inputs --------------------------------------------------------------------------------------


def make_case(bits: int, signed: bool, numel: int, dtype: torch.dtype, device: str, seed: int):
    """Non-uniform positive steps and inputs that cover every interval, both clip branches and
    the exact levels and thresholds (ties), plus dy."""
    gen = torch.Generator().manual_seed(seed)
    qn, qp = signed_range(bits, signed)
    pos = 0.02 + 0.3 * torch.rand(qp, generator=gen)
    neg = 0.02 + 0.3 * torch.rand(qn, generator=gen) if qn else None
    top = pos.sum().item()
    bottom = 0.0 if neg is None else -neg.sum().item()
    span = top - bottom
    x = bottom - 0.1 * span + 1.2 * span * torch.rand(numel, generator=gen)
    c = torch.cumsum(pos, 0)
    special = [c, c - pos / 2, torch.tensor([0.0, top * 1.5])]
    if neg is not None:
        cn = torch.cumsum(neg, 0)
        special += [-cn, -(cn - neg / 2), torch.tensor([bottom * 1.5])]
    special = torch.cat(special)
    k = min(numel, special.numel())
    x[:k] = special[:k]
    x = x[torch.randperm(numel, generator=gen)]
    dy = torch.randn(numel, generator=gen)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return x.to(dtype).to(device), dy.to(dtype).to(device), move(pos), move(neg)


def grad_tolerance(dy: torch.Tensor, scale: float) -> float:
    """fp32 sums in another order: a few ulps of the sum of |terms| (each |term| <= |dy| scale)."""
    return 2e-6 * scale * dy.float().abs().sum().item() + 1e-6


def assert_same_nulsq(kernel: F.Kernel, x, dy, pos, neg, y_ulps: int = 0,
                      partial_needs: bool = True) -> None:
    """kernel's (y, dx, dpos, dneg) against the reference kernels' (and with only dx or only the
    step gradients asked for, when partial_needs)."""
    y_ref = F.nulsq_forward_reference(x, pos, neg)
    y = kernel.forward(x, pos, neg)
    assert y.dtype == x.dtype and y.shape == x.shape
    if x.dtype == torch.float32:
        # The reference sums up to 4 steps in fp32 for its levels and takes the others from
        # torch.cumsum (on CPU accumulated in float64): a level may differ in its last bit.
        torch.testing.assert_close(y, y_ref, rtol=2.5e-7, atol=0)
    else:  # bf16: the fp32 levels, rounded
        _assert_levels_equal(y, kernel.forward(x.float(), pos, neg).to(x.dtype), y_ulps)
    dx_ref, dpos_ref, dneg_ref = F.nulsq_backward_reference(dy, x, pos, neg, 0.37)
    dx, dpos, dneg = kernel.backward(dy, x, pos, neg, 0.37, True, True)
    assert torch.equal(dx, dx_ref)
    tol = grad_tolerance(dy, 0.37)
    torch.testing.assert_close(dpos, dpos_ref, atol=tol, rtol=1e-5)
    if neg is None:
        assert dneg is None
    else:
        torch.testing.assert_close(dneg, dneg_ref, atol=tol, rtol=1e-5)
    if not partial_needs:
        return
    only_x = kernel.backward(dy, x, pos, neg, 0.37, True, False)
    assert torch.equal(only_x[0], dx_ref) and only_x[1] is None and only_x[2] is None
    only_steps = kernel.backward(dy, x, pos, neg, 0.37, False, True)
    assert only_steps[0] is None and torch.allclose(only_steps[1], dpos, atol=tol)


def assert_same_lsq(kernel: F.Kernel, x, dy, step, qn: int, qp: int, y_ulps: int = 0,
                    partial_needs: bool = True) -> None:
    y_ref = F.lsq_forward_reference(x, step, qn, qp)
    _assert_levels_equal(kernel.forward(x, step, qn, qp), y_ref, y_ulps)
    dx_ref, ds_ref = F.lsq_backward_reference(dy, x, step, qn, qp, 0.5)
    dx, ds = kernel.backward(dy, x, step, qn, qp, 0.5, True, True)
    assert torch.equal(dx, dx_ref)
    assert ds.shape == step.shape and ds.dtype == step.dtype
    torch.testing.assert_close(ds, ds_ref, atol=grad_tolerance(dy, 0.5 * max(qn, qp)), rtol=1e-5)
    if not partial_needs:
        return
    assert kernel.backward(dy, x, step, qn, qp, 0.5, False, True)[0] is None
    assert kernel.backward(dy, x, step, qn, qp, 0.5, True, False)[1] is None


def _assert_levels_equal(y: torch.Tensor, y_ref: torch.Tensor, ulps: int) -> None:
    if ulps == 0:
        assert torch.equal(y, y_ref)
    else:  # Triton's interpreter rounds fp32 -> bf16 toward zero (real GPUs: to nearest)
        diff = (y.float() - y_ref.float()).abs()
        assert (diff <= ulps * 2.0**-7 * y_ref.float().abs()).all()


CASES = [(bits, signed, dtype) for bits in BITS for signed in (False, True)
         for dtype in (torch.float32, torch.bfloat16)]


def case_id(case) -> str:
    bits, signed, dtype = case
    return f"{bits}bit-{'signed' if signed else 'unsigned'}-{str(dtype)[6:]}"


# -- CPU: the C kernels --------------------------------------------------------------------------

needs_cpu_build = pytest.mark.skipif(cpu_quant.library() is None,
                                     reason=f"no CPU kernels: {cpu_quant._LOAD_ERROR}")


def _cpu_side_kernels(source: str) -> dict[str, F.Kernel]:
    """The kernels that run on CPU tensors: the C ones, or the fusable ones (run eagerly here:
    the maths; their 8-bit cases check the hand-over to the reference kernels)."""
    if source == "fusable":
        return fusable.KERNELS
    if cpu_quant.library() is None:
        pytest.skip(f"no CPU kernels: {cpu_quant._LOAD_ERROR}")
    return cpu_quant.KERNELS


@pytest.mark.parametrize("source", ["cpu", "fusable"])
@pytest.mark.parametrize("numel", [1, 13, 70_001])  # 70_001: two threads, each with a tail
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cpu_side_kernels_match_reference(case, numel: int, source: str) -> None:
    bits, signed, dtype = case
    fast = _cpu_side_kernels(source)
    x, dy, pos, neg = make_case(bits, signed, numel, dtype, "cpu", seed=bits * 10 + signed)
    assert_same_nulsq(fast["nulsq"], x, dy, pos, neg)
    qn, qp = signed_range(bits, signed)
    for step in (torch.tensor(0.07), torch.tensor([0.11])):
        assert_same_lsq(fast["lsq"], x * 3, dy, step, qn, qp)


def assert_any_step_count(kernel: F.Kernel, qp: int, qn: int) -> None:
    """A grid of qp positive and qn negative steps (no b-bit grid) against the reference."""
    gen = torch.Generator().manual_seed(qp)
    pos = 0.05 + torch.rand(qp, generator=gen)
    neg = 0.05 + torch.rand(qn, generator=gen) if qn else None
    x = torch.randn(5000, generator=gen) * pos.sum()
    assert_same_nulsq(kernel, x, torch.randn(5000, generator=gen), pos, neg)


@needs_cpu_build
@pytest.mark.parametrize("intervals", [(1, 0), (2, 3), (5, 0), (9, 7)])
def test_cpu_kernels_any_step_count(intervals: tuple[int, int]) -> None:
    """The scalar search path, and the smallest vector one."""
    assert_any_step_count(cpu_quant.KERNELS["nulsq"], *intervals)


@needs_cpu_build
def test_cpu_public_ops_layouts_and_dtypes() -> None:
    """Through F.nulsq/F.lsq with the fast path registered: channels_last stays channels_last,
    a dy of another layout is handled, float64 falls back to the reference kernels."""
    kernels.enable()
    assert "cpu" in kernels.enabled()
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, 5, 7, generator=gen)
    pos, neg = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([0.4, 0.1, 0.3, 0.2])
    for x in (base.to(memory_format=torch.channels_last), base.transpose(1, 3), base.double()):
        dy = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        results = []
        for fast in (True, False):
            with contextlib.nullcontext() if fast else kernels.reference_kernels():
                leaves = [t.clone().requires_grad_() for t in (x, pos, neg, torch.tensor(0.3))]
                y = F.nulsq(*leaves[:3], 0.5) + F.lsq(leaves[0], leaves[3], 4, 3)
                y.backward(dy)
                results.append([y.detach()] + [t.grad for t in leaves])
        fast, ref = results
        assert fast[0].stride() == ref[0].stride()
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
        for a, b in zip(fast[2:], ref[2:]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)
    assert "cpu" in kernels.enabled()


@needs_cpu_build
def test_cpu_kernels_under_torch_compile() -> None:
    """With fusion off, whole graph (no graph break) through AOT autograd: the custom ops' fake
    kernels."""
    kernels.enable()
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(11)
    x, dy = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    pos, neg = torch.tensor([0.3, 0.2, 0.4]), torch.tensor([0.25, 0.35, 0.2, 0.3])

    def fn(x, pos, neg, step):
        return F.nulsq(x, pos, neg, 0.5) + F.nulsq(x.relu(), pos) + F.lsq(x, step, 4, 3, 0.25)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    with kernels.opaque_under_compile():
        for f in (fn, compiled):
            leaves = [t.clone().requires_grad_() for t in (x, pos, neg, torch.tensor(0.3))]
            f(*leaves).backward(dy)
            results.append([t.grad for t in leaves] + [f(*leaves).detach()])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager)
    torch._dynamo.reset()


def test_cpu_build_failure_falls_back_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_quant, "_LIB", None)
    monkeypatch.setattr(cpu_quant, "_LOAD_ERROR", None)
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(cpu_quant.shutil, "which", lambda name: None)
    x, dy, pos, neg = make_case(2, True, 100, torch.float32, "cpu", seed=1)
    with pytest.warns(RuntimeWarning, match="reference kernels"):
        y = cpu_quant.nulsq_forward(x, pos, neg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        dx, _, _ = cpu_quant.nulsq_backward(dy, x, pos, neg, 1.0)
    assert torch.equal(y, F.nulsq_forward_reference(x, pos, neg))
    assert torch.equal(dx, F.nulsq_backward_reference(dy, x, pos, neg, 1.0)[0])


def test_disable_and_enable_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    before = kernels.enable()
    kernels.disable()
    assert kernels.enabled() == [] and F._kernel("nulsq", torch.zeros(1)) is F._REFERENCE["nulsq"]
    assert kernels.enable() == before
    for value, allowed in (("0", False), ("off", False), ("1", True), ("", True)):
        monkeypatch.setenv(kernels.ENV_VAR, value)
        assert kernels.env_allows() is allowed
    monkeypatch.setenv(kernels.FUSION_ENV_VAR, "0")
    assert "compile" not in kernels.enable()  # compiled graphs then call the opaque kernels
    monkeypatch.delenv(kernels.FUSION_ENV_VAR)
    assert kernels.enable() == before and "compile" in before
    with kernels.opaque_under_compile():
        assert ("nulsq", "compile") not in F._FAST_PATHS
    assert F._FAST_PATHS[("nulsq", "compile")] is fusable.KERNELS["nulsq"]


# -- compile: the fusable kernels (elementwise torch code inductor fuses with its neighbours) ----


@pytest.mark.parametrize("intervals", [(1, 0), (2, 3), (8, 7), (9, 7)])
def test_fusable_kernels_any_step_count(intervals: tuple[int, int]) -> None:
    """Up to the widest chain (15 intervals) and one past it."""
    assert_any_step_count(fusable.KERNELS["nulsq"], *intervals)


def _generated_kernels(fn, *args) -> tuple[object, list[str]]:
    """fn(*args), and the names of the kernels inductor generated for it (forward, backward)."""
    from torch._inductor.utils import run_and_get_code

    result, codes = run_and_get_code(fn, *args)
    names = re.findall(r"^(\w+) = async_compile\.(?:cpp\w*|triton)\(", "\n".join(codes), re.M)
    assert names, "found no generated kernels: has inductor's code format changed?"
    return result, names


class _FakeQuant(torch.nn.Module):
    """The ops of a 2-bit activation quantizer, with learnable steps."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op
        self.steps = torch.nn.Parameter(torch.tensor([0.3, 0.45, 0.6] if op == "nulsq" else [0.4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.op == "nulsq":
            return F.nulsq(x, self.steps, None, 0.1)
        return F.lsq(x, self.steps, 0, 3, 0.1)


@pytest.mark.slow  # three inductor compiles: about 10 s on 2 cores with a cold cache
@pytest.mark.timeout(400)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not CUDA, reason="needs a CUDA GPU"))])
def test_compile_fuses_quantizers_with_bn_relu(device: str) -> None:
    """A pre-activation block BN -> ReLU -> quantizer -> conv, compiled: the quantizer adds no
    kernel of its own, forward (it joins BN+ReLU) or backward (its step-gradient sums join BN's
    backward reductions), and the compiled block matches the eager one."""
    if device == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        pytest.skip("torch.compile's inductor backend needs a C++ compiler on CPU")
    kernels.enable()

    def make(quantizer):
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.BatchNorm2d(8), torch.nn.ReLU(), quantizer,
                                    torch.nn.Conv2d(8, 8, 3, padding=1))
        return block.to(device)

    def train_step(block, x):
        out = block(x)
        out.square().mean().backward()
        return out.detach()

    x = torch.randn(4, 8, 12, 12, device=device)
    counts = {}
    for name, quantizer in [("fp", torch.nn.Identity()), ("lsq", _FakeQuant("lsq")),
                            ("nulsq", _FakeQuant("nulsq"))]:
        torch._dynamo.reset()
        eager, compiled = make(quantizer), make(copy.deepcopy(quantizer))
        y_compiled, names = _generated_kernels(train_step, torch.compile(compiled), x)
        counts[name] = len(names)
        if name == "fp":
            continue
        y_eager = train_step(eager, x)
        torch.testing.assert_close(y_compiled, y_eager, atol=1e-4, rtol=1e-4)
        for a, b in zip(compiled.parameters(), eager.parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3)
    torch._dynamo.reset()
    assert counts["lsq"] == counts["fp"] and counts["nulsq"] == counts["fp"], counts


# -- Triton: the CUDA kernels, run on CPU tensors by Triton's interpreter ------------------------
# The interpreter works only when TRITON_INTERPRET=1 is set before triton is first imported (its
# standard library is made of jit functions), which torch may already have done in this process:
# so a driver test reruns these tests in a fresh `TRITON_INTERPRET=1 pytest` subprocess.

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(scope="module")
def interpreted_triton():
    if not INTERPRETING:
        pytest.skip("runs inside test_triton_kernels_in_the_interpreter's subprocess")
    try:
        from nulsq.quant.kernels import triton_quant

        triton_quant.lsq_forward(torch.ones(3), torch.tensor(1.0), 0, 3)  # a probe launch
    except Exception as err:  # noqa: BLE001 (any failure means: no usable interpreter)
        pytest.skip(f"this triton's interpreter cannot run the kernels on CPU: {err!r}"[:300])
    return triton_quant


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_triton_kernels_match_reference_interpreted(interpreted_triton, case) -> None:
    bits, signed, dtype = case
    numel = 4096 + 77  # one full block and a ragged one
    x, dy, pos, neg = make_case(bits, signed, numel, dtype, "cpu", seed=bits * 10 + signed)
    ulps = 1 if dtype == torch.bfloat16 else 0
    assert_same_nulsq(interpreted_triton.KERNELS["nulsq"], x, dy, pos, neg, y_ulps=ulps)
    qn, qp = signed_range(bits, signed)
    assert_same_lsq(interpreted_triton.KERNELS["lsq"], x * 3, dy, torch.tensor(0.07), qn, qp,
                    y_ulps=ulps)


@pytest.mark.skipif(INTERPRETING, reason="already inside the interpreter run")
@pytest.mark.skipif(CUDA, reason="a GPU is visible: the CUDA section runs the compiled kernels")
def test_triton_kernels_in_the_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__,
         "-k", "interpreted"],
        env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode in (0, 5), proc.stdout[-4000:] + proc.stderr[-2000:]
    if f"{len(CASES)} passed" not in proc.stdout:
        reason = [line for line in proc.stdout.splitlines() if "SKIPPED" in line]
        pytest.skip(reason[0] if reason else proc.stdout[-500:])


# -- CUDA: the compiled Triton kernels (scripts/gpu_check.sh runs these) -------------------------

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("numel", [1, 4097, 3_000_001])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_cuda_kernels_match_reference(case, numel: int) -> None:
    from nulsq.quant.kernels import triton_quant

    bits, signed, dtype = case
    x, dy, pos, neg = make_case(bits, signed, numel, dtype, "cuda", seed=bits * 10 + signed)
    partial = numel == 4097  # each need_* mix is another compiled kernel: check it once
    assert_same_nulsq(triton_quant.KERNELS["nulsq"], x, dy, pos, neg, partial_needs=partial)
    qn, qp = signed_range(bits, signed)
    assert_same_lsq(triton_quant.KERNELS["lsq"], x * 3, dy, torch.tensor(0.07, device="cuda"),
                    qn, qp, partial_needs=partial)


@needs_cuda
def test_cuda_fast_path_is_registered() -> None:
    from nulsq.quant.kernels import triton_quant

    kernels.enable()
    assert F._kernel("nulsq", torch.zeros(1, device="cuda")) is triton_quant.KERNELS["nulsq"]
    assert F._kernel("lsq", torch.zeros(1, device="cuda")) is triton_quant.KERNELS["lsq"]


def _cuda_fn(x, pos, neg, pos4, step):
    return (F.nulsq(x, pos, neg, 0.5) + F.nulsq(x.relu(), pos4) + F.lsq(x, step, 4, 3, 0.25))


def _cuda_inputs():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 16, 9, 9, generator=gen).to("cuda", memory_format=torch.channels_last)
    dy = torch.randn(8, 16, 9, 9, generator=gen).cuda()
    pos, neg = 0.1 + torch.rand(3, generator=gen), 0.1 + torch.rand(4, generator=gen)
    pos4 = 0.05 + 0.2 * torch.rand(15, generator=gen)
    return x, dy, [t.cuda() for t in (pos, neg, pos4, torch.tensor(0.3))]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_torch_compile_matches_eager(dtype: torch.dtype) -> None:
    kernels.enable()
    torch._dynamo.reset()
    x, dy, params = _cuda_inputs()
    x, dy = x.to(dtype), dy.to(dtype)
    compiled = torch.compile(_cuda_fn, fullgraph=True)
    results = []
    for f in (_cuda_fn, compiled):
        leaves = [t.clone().requires_grad_() for t in (x, *params)]
        y = f(*leaves)
        y.backward(dy)
        results.append([y.detach()] + [t.grad for t in leaves])
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp.float(), eager.float(), atol=1e-3, rtol=1e-3)


@needs_cuda
def test_cuda_graph_capture_of_forward_and_backward() -> None:
    """No host synchronisation: the ops and their backward record into a CUDA graph."""
    kernels.enable()
    x, dy, params = _cuda_inputs()
    leaves = [t.clone().requires_grad_() for t in (x, *params)]

    def step():
        for t in leaves:
            t.grad = None
        _cuda_fn(*leaves).backward(dy)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up (Triton compiles, allocator settles) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    expected = [t.grad.clone() for t in leaves]
    graph = torch.cuda.CUDAGraph()
    for t in leaves:
        t.grad = None
    with torch.cuda.graph(graph):
        _cuda_fn(*leaves).backward(dy)
    graph.replay()
    torch.cuda.synchronize()
    for t, want in zip(leaves, expected):
        torch.testing.assert_close(t.grad, want)


@needs_cuda
def test_cuda_compiled_training_step_of_a_quantized_model() -> None:
    """A pre-act ResNet-20 nuLSQ-A 2-bit step, compiled with bf16 autocast, matches eager."""
    from omegaconf import OmegaConf

    from nulsq import models
    from nulsq.quant import initialize_quantizers, quantize_model, quantizer_parameters

    kernels.enable()
    torch._dynamo.reset()
    qcfg = OmegaConf.create({"name": "nulsq_a", "bits": 2, "weight": {"kind": "lsq", "args": {}},
                             "act": {"kind": "nulsq", "args": {}}, "grad_scale": "lsq",
                             "first_last": "dynamic8", "signed_act": None})
    torch.manual_seed(0)
    model = models.build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(model, qcfg, False, "lsq", verbose=False)
    model = model.cuda().to(memory_format=torch.channels_last)
    images = torch.randn(16, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (16,), device="cuda")
    initialize_quantizers(model, [(images, labels)], 1)
    losses = []
    for net in (model, torch.compile(model)):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        losses.append(loss.item())
        steps = quantizer_parameters(model)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in steps)
        assert sum(p.grad.abs().sum().item() for p in steps) > 0
    # bf16 and another fusion order may move a few values across a 2-bit threshold: close, not equal
    assert abs(losses[1] - losses[0]) < 0.05 * abs(losses[0])
