"""Speed of the quantizer ops and of whole training steps, on this machine's device.

    python scripts/bench.py                     # ops + steps on CUDA if visible, else CPU
    python scripts/bench.py --quick --out bench.json
    NULSQ_FAST_KERNELS=0 python scripts/bench.py  # everything on the reference kernels

Op level: our fused fake-quantizers (forward + backward, fp32) against PyTorch's fused learnable
LSQ op and a plain copy `y.copy_(x)`, with the ratio to the memory floor: 20 bytes per element
(forward reads x, writes y; backward reads x and dy, writes dx) at the copy's bandwidth; without
--quick also the reference kernels (A/B).
Step level: one training step (forward, loss, backward, optimizer steps) of the models the paper
times, with the trainer's own code (`nulsq.train.build`, the real configs/quantizer/*.yaml, the
optimizers and schedules of the run's last planned stage, `nulsq.train.loop.train_step`; bf16
autocast + channels_last + torch.compile on CUDA, fp32 eager on CPU unless --compile on), with
ratios to the same model's FP step. A/B rows: nuLSQ-A 2-bit on the reference kernels, and (when
compiled) with the quantizers as opaque kernels in the compiled graph instead of fused into it
(`kernels.opaque_under_compile`).
All cases of a table take turns in every timed round (after warm-up), so a busy machine slows
them alike: "ms" is the median over rounds, each ratio the median of the per-round ratios.
Step configurations that do not fit in --budget-s (or fail) are skipped and listed, so the script
always ends in time.
Rivals (--rivals; --rivals-only skips the tables above): each rival quantizer (PACT, APoT, LCQ,
DoReFa, LQ-Nets, on activations) forward + backward against PyTorch's fused LSQ op, also on the
reference kernels (the rivals' torch code alone: the C kernels' A/B on CPU), and one
training step of pre-activation ResNet-20 (batch 32 on CPU) per rival config against FP.

    python scripts/bench.py --device cpu --rivals-only --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nulsq.quant import functional as F  # noqa: E402
from nulsq.quant import kernels  # noqa: E402

# -- timing --------------------------------------------------------------------------------------


def _time_block(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Mean ms per call of `calls` back-to-back calls (CUDA: events around the block)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) * 1e3 / calls


def interleaved_ms(cases: dict[str, Callable[[], object]], device: torch.device, warmup: int,
                   rounds: int, calls: int) -> dict[str, dict[str, float]]:
    """Median and min over `rounds` of each case's ms per call, the cases taking turns within
    every round, so that a busy machine (shared CI cores) slows them alike."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_time_block(fn, device, calls))
    return {name: {"ms": statistics.median(v), "min_ms": min(v), "samples": v}
            for name, v in samples.items()}


# -- op level ------------------------------------------------------------------------------------


def _fwd_bwd(op: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, dy: torch.Tensor):
    """One forward + backward of op on a fresh leaf (x0 is reused, its .grad dropped)."""

    def run() -> None:
        x0.grad = None
        op(x0).backward(dy)

    return run


def _unsigned_steps(bits: int, device: torch.device) -> torch.Tensor:
    qp = 2**bits - 1
    return torch.full((qp,), 3.0 / qp, device=device, requires_grad=True)


def op_rows(device: torch.device, numel: int, reps: int, bits_list: list[int]) -> list[dict]:
    """Time the ops on `numel` fp32 elements; bytes moved as each op needs at the least."""
    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(numel, device=device, generator=gen).abs_().requires_grad_()
    dy = torch.randn(numel, device=device, generator=gen)
    y = torch.empty_like(x0)
    step = torch.tensor([0.5], device=device, requires_grad=True)
    zero = torch.tensor([0.0], device=device)
    cases: list[tuple[str, Callable[[], object], int]] = [
        ("copy y.copy_(x)", lambda: y.copy_(x0.detach()), 8),
        ("torch fused LSQ op (2-bit)", _fwd_bwd(
            lambda x: torch._fake_quantize_learnable_per_tensor_affine(x, step, zero, 0, 3, 1.0),
            x0, dy), 20),
        ("ours LSQ 2-bit", _fwd_bwd(lambda x: F.lsq(x, step, 0, 3), x0, dy), 20),
    ]
    for bits in bits_list:
        steps = _unsigned_steps(bits, device)
        cases.append((f"ours nuLSQ {bits}-bit", _fwd_bwd(
            lambda x, s=steps: F.nulsq(x, s), x0, dy), 20))
    if device.type == "cuda":  # as the trainer runs them: the small grid ops fuse
        for bits in bits_list[:2]:
            steps = _unsigned_steps(bits, device)
            compiled = torch.compile(lambda x, s=steps: F.nulsq(x, s))
            cases.append((f"ours nuLSQ {bits}-bit, compiled", _fwd_bwd(compiled, x0, dy), 20))
    times = interleaved_ms({name: fn for name, fn, _ in cases}, device, warmup=2,
                           rounds=reps, calls=1)
    rows = []
    for name, _, bytes_per_elem in cases:
        ms = times[name]["ms"]
        rows.append({"op": name, "numel": numel, "ms": ms, "min_ms": times[name]["min_ms"],
                     "samples": times[name]["samples"],
                     "gb_per_s": bytes_per_elem * numel / ms / 1e6})
    copy, fused = rows[0]["samples"], rows[1]["samples"]
    for row in rows[1:]:  # ratios within each round, then the median (see interleaved_ms)
        pairs = list(zip(row["samples"], fused, copy))
        row["vs_torch_fused_lsq"] = statistics.median(ms / f for ms, f, _ in pairs)
        # memory floor: 20 bytes per element at the copy's bandwidth (8 bytes per element)
        row["vs_memory_floor"] = statistics.median(ms / (c * 20 / 8) for ms, _, c in pairs)
    return rows


# rival op rows: (label, quantizer kind, quantizer args), activations after ReLU (unsigned)
RIVAL_OPS = [("PACT", "pact", {}), ("APoT", "apot", {}), ("LCQ", "lcq", {}),
             ("DoReFa", "dorefa", {}), ("LQ-Nets (training: QEM fit)", "lqnets", {})]
# rival step rows: configs/quantizer/<name>.yaml, FP and LSQ first for reference
RIVAL_STEP_METHODS = ["fp", "lsq", "dorefa", "pact", "apot", "lqnets", "lcq", "lcq_apot_type"]


def rival_op_rows(device: torch.device, numel: int, reps: int, bits: int) -> list[dict]:
    """Each rival's quantizer module, forward + backward on `numel` fp32 post-ReLU elements, as it
    runs and on the reference kernels (its torch code alone), with the ratio to PyTorch's fused
    LSQ op measured in the same rounds."""
    import nulsq.quant.rivals  # noqa: F401  (registers the kinds)
    from nulsq.quant.base import QUANTIZERS

    gen = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(numel, device=device, generator=gen).relu_().requires_grad_()
    dy = torch.randn(numel, device=device, generator=gen)
    step = torch.tensor([0.5], device=device, requires_grad=True)
    zero = torch.tensor([0.0], device=device)
    qmax = 2**bits - 1
    cases: dict[str, Callable[[], object]] = {"torch fused LSQ op": _fwd_bwd(
        lambda x: torch._fake_quantize_learnable_per_tensor_affine(x, step, zero, 0, qmax, 1.0),
        x0, dy)}
    for label, kind, args in RIVAL_OPS:
        q = QUANTIZERS.get(kind)(bits=bits, signed=False, role="act", **args).to(device).train()
        if getattr(q, "theta", None) is not None:  # a learned compander, not the identity
            with torch.no_grad():
                q.theta.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
        cases[f"{label} {bits}-bit"] = _fwd_bwd(q, x0, dy)
        # A/B: the rival's torch code with every fast path off (CPU: no C kernel at all)
        cases[f"{label} {bits}-bit, reference kernels"] = _in_context(_fwd_bwd(q, x0, dy),
                                                                      kernels.reference_kernels)
    times = interleaved_ms(cases, device, warmup=2, rounds=reps, calls=1)
    fused = times["torch fused LSQ op"]["samples"]
    return [{"op": name, "numel": numel, "ms": t["ms"], "min_ms": t["min_ms"],
             "vs_torch_fused_lsq": statistics.median(a / b for a, b in zip(t["samples"], fused))}
            for name, t in times.items()]


def rival_step_plan(device: torch.device, models: list[str] | None, bits_list: list[int]
                    ) -> list[tuple[str, int, int, str, int, str]]:
    """(model, batch, image side, method, bits, "fast") for every rival config and FP."""
    shape = ("preresnet20", 128, 32) if device.type == "cuda" else ("preresnet20", 32, 32)
    if models and shape[0] not in models:
        return []
    return [(*shape, m, b, "fast") for b in bits_list for m in RIVAL_STEP_METHODS
            if m != "fp" or b == bits_list[0]]


def reference_op_rows(device: torch.device, numel: int, bits_list: list[int]) -> list[dict]:
    """The same nuLSQ op on the reference kernels (A/B), fewer repetitions: it is slow."""
    with kernels.reference_kernels():
        rows = op_rows(device, numel, reps=3, bits_list=bits_list)
    return [dict(r, op=r["op"].replace("ours", "reference")) for r in rows if "nuLSQ" in r["op"]]


# -- step level ----------------------------------------------------------------------------------


def compose(model: str, method: str, bits: int):
    """The run config `python train.py model=<model> quantizer=<method> quantizer.bits=<bits>`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from nulsq.config import register_schema

    register_schema()
    overrides = [f"model={model}", f"quantizer={method}", "logger=none"]
    if method != "fp":
        overrides.append(f"quantizer.bits={bits}")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def make_step(cfg, device: torch.device, batch: int, size: int, compile: bool
              ) -> Callable[[], None]:
    """One training step of cfg's model as nulsq.train runs it (its model, quantizer plan and the
    optimizers and schedules its last planned stage builds, `loop.train_step`), on fixed random
    data, with the trainer's "auto" runtime for `device`."""
    from nulsq.quant import initialize_quantizers
    from nulsq.train.build import build_model, quantize
    from nulsq.train.loop import train_step
    from nulsq.train.plan import build_stage_optim, plan_stages
    from nulsq.train.runtime import Runtime

    torch.manual_seed(0)
    cuda = device.type == "cuda"
    runtime = Runtime(device, amp=cuda, channels_last=cuda, compile=compile)
    stage = plan_stages(cfg)[-1]  # QAT for a quantizer, FP for quantizer=fp
    model, _ = build_model(cfg, 10, quantized=False, verbose=False, load_pretrained=False,
                           image_size=size)
    if stage.quantized:
        quantize(model, cfg, verbose=False)
    model = model.to(device)
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    initialize_quantizers(model, [(images, labels)], 1)
    optimizers, schedulers = build_stage_optim(model, stage, steps_per_epoch=1)
    net = torch.compile(model) if runtime.compile else model
    model.train()

    def step() -> None:
        train_step(net, images, labels, optimizers, schedulers, runtime.autocast)

    return step


def step_plan(device: torch.device, quick: bool, models: list[str] | None, compile: bool
              ) -> list[tuple[str, int, int, str, int, str]]:
    """(model, batch, image side, method, bits, kernels variant), most wanted first: when the
    time budget runs out, the tail is skipped."""
    if device.type == "cuda":
        shapes = [("preresnet20", 128, 32), ("preresnet18", 256, 224)]
        first = [("fp", 32), ("nulsq_a", 2), ("lsq", 2)]
        then = [("nulsq_a", 4), ("nulsq_a", 3)] + ([] if quick else [("lsq", 4), ("nulsq_wa", 2)])
    else:
        shapes = [("preresnet20", 32, 32)]
        first = [("fp", 32), ("nulsq_a", 2), ("lsq", 2), ("nulsq_a", 4)]
        then = [] if quick else [(m, b) for m in ("nulsq_a", "lsq", "nulsq_w", "nulsq_wa")
                                 for b in (2, 3, 4) if (m, b) not in first]
    shapes = [s for s in shapes if not models or s[0] in models]
    plan = [(*shape, m, b, "fast") for m, b in first + then for shape in shapes]
    if compile:  # A/B: the quantizers as opaque kernels in the compiled graph, unfused
        plan += [(*shape, "nulsq_a", 2, "opaque") for shape in shapes]
    # A/B: the same nuLSQ-A 2-bit step on the reference kernels
    plan += [(*shape, "nulsq_a", 2, "reference") for shape in shapes[:1]]
    return plan


def _label(model: str, batch: int, size: int, method: str, bits: int, variant: str) -> str:
    label = f"{model} b{batch} {size}px {method}" + ("" if method == "fp" else f" {bits}-bit")
    return label + ("" if variant == "fast" else f" ({variant} kernels)")


# A/B kernels variant -> the context every call of its step runs in (a compiled graph is traced
# in the first calls, so the context must hold then and for as long as the graph is reused);
# "fast" steps run bare
_VARIANTS = {"reference": kernels.reference_kernels, "opaque": kernels.opaque_under_compile}


def _in_context(step: Callable[[], None], context) -> Callable[[], None]:
    def run() -> None:
        with context():
            step()

    return run


def step_rows(device: torch.device, quick: bool, models: list[str] | None, compile: bool,
              warmup: int, rounds: int, calls: int, build_deadline: float,
              plan: list[tuple[str, int, int, str, int, str]] | None = None
              ) -> tuple[list[dict], list[str]]:
    """Build (and compile, if asked) every planned step (default: `step_plan`) until the
    deadline, then time them all, taking turns; ratios are to the same model's FP step."""
    # every model instance is a recompile of the same forward code objects: allow them all
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    built: dict[str, tuple[dict, Callable[[], None]]] = {}
    skipped = []
    if plan is None:
        plan = step_plan(device, quick, models, compile)
    for model, batch, size, method, bits, variant in plan:
        label = _label(model, batch, size, method, bits, variant)
        if time.monotonic() > build_deadline:
            skipped.append(label)
            continue
        t0 = time.monotonic()
        try:
            step = make_step(compose(model, method, bits), device, batch, size, compile)
            if variant != "fast":
                step = _in_context(step, _VARIANTS[variant])
            for _ in range(warmup):  # compiles
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as err:  # noqa: BLE001  (one broken configuration must not end the run)
            print(f"  FAILED {label}: {type(err).__name__}: {str(err)[:800]}", flush=True)
            skipped.append(f"{label} (failed: {type(err).__name__})")
            continue
        meta = {"model": model, "batch": batch, "size": size, "method": method,
                "bits": None if method == "fp" else bits, "kernels": variant,
                "setup_s": time.monotonic() - t0}
        built[label] = (meta, step)
        print(f"  built {label} ({meta['setup_s']:.0f} s)", flush=True)
    times = interleaved_ms({k: v[1] for k, v in built.items()}, device, 0, rounds, calls)
    rows = [{**meta, **times[label]} for label, (meta, _) in built.items()]
    fp = {r["model"]: r["samples"] for r in rows if r["method"] == "fp"}
    for r in rows:
        if r["model"] in fp:  # ratio within each round (same machine load), then the median
            r["vs_fp"] = statistics.median(a / b for a, b in zip(r["samples"], fp[r["model"]]))
    return rows, skipped


# -- report --------------------------------------------------------------------------------------


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table; columns are (header, key, format)."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = [(f"{r[k]:{fmt}}" if r.get(k) is not None else "") for _, k, fmt in columns]
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *body])


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer configurations and repetitions")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--numel", type=int, help="op size (default: 51M on CUDA, 4M on CPU)")
    parser.add_argument("--budget-s", type=float,
                        help="stop starting new step benchmarks after this many seconds "
                             "(default: 150 on CPU, 330 on CUDA)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--models", type=lambda v: v.split(","),
                        help="comma-separated models for the step benchmark (default: all)")
    parser.add_argument("--no-ops", action="store_true", help="skip the op benchmark")
    parser.add_argument("--no-steps", action="store_true", help="skip the step benchmark")
    parser.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                        help="torch.compile the training steps (auto: on CUDA only)")
    parser.add_argument("--rivals", action="store_true",
                        help="also time the rival quantizers (op level and step level)")
    parser.add_argument("--rivals-only", action="store_true",
                        help="time only the rival quantizers (implies --rivals)")
    parser.add_argument("--rival-bits", type=lambda v: [int(b) for b in v.split(",")], default=[2],
                        help="comma-separated bit widths of the rival tables (default: 2)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    start = time.monotonic()
    budget = args.budget_s if args.budget_s is not None else (330.0 if cuda else 150.0)
    numel = args.numel or (256 * 64 * 56 * 56 if cuda else 4 * 2**20)
    op_reps = (10 if args.quick else 30) if cuda else (5 if args.quick else 9)
    warmup, rounds, calls = (3, 10, 5) if cuda else (2, 6 if args.quick else 10, 1)
    if cuda:
        torch.backends.cudnn.benchmark = True

    result: dict = {
        "device": describe_device(device),
        "torch": torch.__version__,
        "fast_paths": kernels.enabled(),
        "quick": args.quick,
    }
    try:
        import triton

        result["triton"] = triton.__version__
    except ImportError:
        result["triton"] = None
    print(f"# nulsq bench on {result['device']} (torch {torch.__version__}, fast paths: "
          f"{', '.join(result['fast_paths']) or 'none'})", flush=True)

    if not args.no_ops and not args.rivals_only:
        bits_list = [2, 4] if args.quick else [2, 3, 4, 8]
        ops = op_rows(device, numel, op_reps, bits_list)
        if not args.quick:
            ops += reference_op_rows(device, numel, [2, 4])
        result["ops"] = ops
        print(f"\n## Op forward+backward, {numel / 1e6:.1f}M fp32 elements\n")
        print(_table(ops, [("op", "op", "s"), ("ms", "ms", ".3f"), ("GB/s", "gb_per_s", ".1f"),
                           ("min ms", "min_ms", ".3f"),
                           ("x torch fused LSQ", "vs_torch_fused_lsq", ".2f"),
                           ("x memory floor", "vs_memory_floor", ".2f")]), flush=True)

    if not args.no_steps and not args.rivals_only:
        compile = args.compile == "on" or (args.compile == "auto" and cuda)
        print(f"\n## Training step (median ms, {'compiled' if compile else 'eager'})\n",
              flush=True)
        reserve = 30.0  # for the timed rounds after the last build
        result["compiled_steps"] = compile
        steps, skipped = step_rows(device, args.quick, args.models, compile, warmup, rounds,
                                   calls, start + budget - reserve)
        result["steps"], result["skipped"] = steps, skipped
        print()
        print(_table(steps, [("model", "model", "s"), ("batch", "batch", "d"),
                             ("method", "method", "s"), ("bits", "bits", "d"),
                             ("kernels", "kernels", "s"),
                             ("ms", "ms", ".2f"), ("min ms", "min_ms", ".2f"),
                             ("x FP", "vs_fp", ".2f"),
                             ("setup s", "setup_s", ".0f")]))
        if skipped:
            print(f"\nskipped (over the {budget:.0f} s budget): {'; '.join(skipped)}")

    if args.rivals or args.rivals_only:
        _rival_tables(args, device, cuda, numel, op_reps, warmup, rounds, calls, start, budget,
                      result)

    result["total_s"] = time.monotonic() - start
    print(f"\ntotal {result['total_s']:.0f} s", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0


def _rival_tables(args, device: torch.device, cuda: bool, numel: int, op_reps: int, warmup: int,
                  rounds: int, calls: int, start: float, budget: float, result: dict) -> None:
    """The rival op and step tables (--rivals), into `result` and printed."""
    if not args.no_ops:
        rows = [row for bits in args.rival_bits
                for row in rival_op_rows(device, numel, op_reps, bits)]
        result["rival_ops"] = rows
        print(f"\n## Rival ops forward+backward, {numel / 1e6:.1f}M fp32 elements\n")
        print(_table(rows, [("op", "op", "s"), ("ms", "ms", ".3f"), ("min ms", "min_ms", ".3f"),
                            ("x torch fused LSQ", "vs_torch_fused_lsq", ".2f")]), flush=True)
    if not args.no_steps:
        compile = args.compile == "on" or (args.compile == "auto" and cuda)
        print(f"\n## Rival training steps (median ms, {'compiled' if compile else 'eager'})\n",
              flush=True)
        plan = rival_step_plan(device, args.models, args.rival_bits)
        # the rival table gets its own budget when it is the only one
        deadline = (time.monotonic() + budget if args.rivals_only else start + budget) - 30.0
        steps, skipped = step_rows(device, args.quick, args.models, compile, warmup, rounds, calls,
                                   deadline, plan=plan)
        result["rival_steps"], result["rival_skipped"] = steps, skipped
        print()
        print(_table(steps, [("model", "model", "s"), ("batch", "batch", "d"),
                             ("method", "method", "s"), ("bits", "bits", "d"),
                             ("ms", "ms", ".2f"), ("min ms", "min_ms", ".2f"),
                             ("x FP", "vs_fp", ".2f"), ("setup s", "setup_s", ".0f")]))
        if skipped:
            print(f"\nskipped (over the budget): {'; '.join(skipped)}")


if __name__ == "__main__":
    sys.exit(main())
