"""Train the same network for N steps in nulsq and in the authors' code, and show they agree.

    git clone https://github.com/DensoITLab/nuLSQ /tmp/nuLSQ          # their code, never copied here
    python scripts/compare_with_authors.py --authors /tmp/nuLSQ        # 9 cases, 20 steps each
    python scripts/compare_with_authors.py --authors /tmp/nuLSQ --methods nulsq_a --bits 2 --steps 50
    python scripts/compare_with_authors.py --authors /tmp/nuLSQ --free-run    # no re-synchronising

What is compared, for pre-act ResNet-20 (CIFAR, 10 classes) quantized as nuLSQ-A, nuLSQ-WA and LSQ
at 2, 3 and 4 bits with 8-bit first/last layers (the authors' CIFAR configs):
  1. after step-size initialisation (MSE init with the authors' constants, `init=mse_authors`,
     `init.protocol=authors`, the same K batches):
     every step size, and BatchNorm's running statistics (the authors' init runs in train mode);
  2. after each of N optimizer steps (SGD with momentum for weights, AdamW for step sizes, the
     same lr / weight decay on both sides, constant lr) on the same fixed batches:
     the training loss on each side, the largest relative difference of the network's weights and
     BatchNorm statistics, and of the step sizes;
  3. one evaluation pass (eval mode) on the same batches: top-1 on each side and the fraction of
     identical predictions.

Relative difference of a tensor: max|ours - theirs| / max(max|theirs|, 0.01); the floor keeps
tensors that sit near zero (a BatchNorm bias one step from its zero init, whose gradient is a sum
with heavy cancellation: fp32 summation order alone moves it by ~1e-3 of itself) from reading as
divergence. Step sizes (positive): elementwise |ours - theirs| / |theirs|. Loss: relative.

Re-synchronising (the default): at 2 bits, ulp-level differences between two correct fp32
implementations flip a few roundings per step, and two free-running trainings then drift apart
chaotically (the loss differs by ~1e-2 after a handful of steps), which says nothing about whether
the step is the same. So before each compared step the authors' side is set to our state
(weights, BatchNorm buffers, step sizes, and both optimizers' states), and each row measures one
step from an identical state. `--free-run` skips that and reports how many steps stay within the
tolerance. The tolerance (fp32, re-synchronised) is --tol (default 1e-4) for weights and loss and
--step-tol (default 1e-3) for step sizes: AdamW divides each gradient by its running RMS, so a
step size whose gradient is ~1e-7 moves by lr either way.

Name map (ours -> theirs): both build the model with pytorchcv's `preresnet20_cifar10`, so the
network's parameter and buffer names are the same. Quantizer parameters:
  <layer>.weight_quant.step       -> <layer>.w_scale[0]           (LSQ)
  <layer>.act_quant.step          -> <layer>.x_scale[0]           (LSQ)
  <layer>.act_quant.pos_steps     -> <layer>.x_scale              (unsigned nuLSQ: s_1..s_Qp)
  <layer>.weight_quant.neg_steps  -> <layer>.w_scale[:Qn]         (signed nuLSQ: s'_1..s'_Qn,
  <layer>.weight_quant.pos_steps  -> <layer>.w_scale[Qn:]          then s_1..s_Qp, both outward)
The authors' buffers `init_state` and `Ns_x` have no counterpart and are not compared.

Exit status: 0 when every case stays within tolerance, 1 when one diverges, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nulsq.errors import UserError  # noqa: E402

AUTHORS_URL = "https://github.com/DensoITLab/nuLSQ"
METHODS = ("nulsq_a", "nulsq_wa", "lsq")
NEAR_ZERO = 0.01  # the magnitude below which a tensor's differences are measured absolutely
# The authors' quantizer class names for (weight, activation) of each method.
AUTHORS_QUANTIZERS = {
    "nulsq_a": ("LSQ_quantizer", "Positive_nuLSQ_quantizer"),
    "nulsq_wa": ("Symmetric_nuLSQ_quantizer", "Positive_nuLSQ_quantizer"),
    "lsq": ("LSQ_quantizer", "LSQ_quantizer"),
}


@dataclass
class Hyper:
    """The optimisation both sides use (the authors' README example for pre-act ResNet-20)."""

    lr: float = 0.04
    momentum: float = 0.9
    weight_decay: float = 1e-4
    step_lr: float = 4e-4
    step_weight_decay: float = 1e-4


# -- one side of the comparison ---------------------------------------------------------------


@dataclass
class Slot:
    """Where a tensor named in our namespace lives on a side: `param[index]`, shaped like ours."""

    tensor: Tensor
    index: object = None  # None = the whole tensor; else an index into it
    shape: tuple = ()

    def get(self) -> Tensor:
        return slot_value(self.tensor, self)

    def set(self, value: Tensor) -> None:
        with torch.no_grad():
            if self.index is None:
                self.tensor.copy_(value.reshape(self.tensor.shape))
            else:
                self.tensor[self.index] = value.reshape(self.tensor[self.index].shape)


@dataclass
class Side:
    """A model with its optimizers and the map from our names to its tensors.

    `slots` names every parameter and buffer in OUR namespace; `steps` lists the names that are
    quantizer step sizes (compared with --step-tol)."""

    name: str
    model: nn.Module
    optimizers: list[torch.optim.Optimizer]
    slots: dict[str, Slot]
    steps: set[str] = field(default_factory=set)

    def state(self) -> dict[str, Tensor]:
        return {k: s.get().clone() for k, s in self.slots.items()}

    def load(self, state: dict[str, Tensor]) -> None:
        for k, s in self.slots.items():
            s.set(state[k])

    def optimizer_state(self) -> dict[str, dict]:
        """Each parameter's optimizer state (momentum, Adam moments and count), by our names."""
        out = {}
        for opt in self.optimizers:
            for p, st in opt.state.items():
                for name, slot in self.slots.items():
                    if slot.tensor is p:
                        out[name] = {k: v.detach().clone() if k == "step" else
                                     slot_value(v, slot) for k, v in st.items()}
        return out

    def load_optimizer_state(self, states: dict[str, dict]) -> None:
        """Set this side's optimizer state from `optimizer_state()` of the other side."""
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    for name, slot in self.slots.items():
                        if slot.tensor is not p or name not in states:
                            continue
                        st = opt.state.setdefault(p, {})
                        for k, v in states[name].items():
                            if k == "step":  # Adam's count: the same for every slot of p
                                st[k] = v.clone()
                            elif slot.index is None:
                                st[k] = v.clone().reshape(p.shape)
                            else:
                                buf = st.setdefault(k, torch.zeros_like(p))
                                buf[slot.index] = v.reshape(buf[slot.index].shape)

    def train_step(self, images: Tensor, labels: Tensor) -> float:
        self.model.train()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(self.model(images), labels)
        loss.backward()
        for opt in self.optimizers:
            opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def predict(self, images: Tensor) -> Tensor:
        self.model.eval()
        return self.model(images).argmax(1)


def slot_value(tensor: Tensor, slot: Slot) -> Tensor:
    """`tensor` (the slot's parameter or a state tensor shaped like it) cut as the slot says."""
    value = tensor.detach() if slot.index is None else tensor.detach()[slot.index]
    return value.reshape(slot.shape)


# -- building our side ------------------------------------------------------------------------


def our_config(method: str, bits: int, hyper: Hyper, init_batches: int):
    """The config `python train.py` would run for this case (the real configs/, Hydra compose)."""
    from hydra import compose, initialize_config_dir

    from nulsq.config import register_schema, validate

    register_schema()
    overrides = [
        "logger=none", "model=preresnet20", f"quantizer={method}", f"quantizer.bits={bits}",
        "quantizer.first_last=dynamic8", "quantizer.grad_scale=none", "init=mse_authors",
        f"init.batches={init_batches}", "init.protocol=authors", "optim=sgd_adamw",
        f"optim.weights.lr={hyper.lr}", f"optim.weights.momentum={hyper.momentum}",
        "optim.weights.nesterov=false", f"optim.weights.weight_decay={hyper.weight_decay}",
        f"optim.quant.lr={hyper.step_lr}", f"optim.quant.weight_decay={hyper.step_weight_decay}",
        "model.pretrained=false",
    ]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return validate(compose("config", overrides=overrides))


def build_ours_fp(cfg, device: torch.device) -> nn.Module:
    from nulsq.train.build import build_model

    model, _ = build_model(cfg, num_classes=10, quantized=False, verbose=False, image_size=32)
    return model.to(device)


def our_side(cfg, model: nn.Module, batches: list, name: str = "nulsq") -> Side:
    """Quantize our FP `model` as `cfg` says, initialise its steps on `batches`, build optimizers."""
    from nulsq.quant.base import Quantizer
    from nulsq.train.build import quantize
    from nulsq.train.optim import build_optimizers

    quantize(model, cfg, verbose=False)
    initialise_ours(model, batches, cfg)
    optimizers = list(build_optimizers(model, cfg.optim).values())
    slots = {n: Slot(p, None, tuple(p.shape)) for n, p in model.named_parameters()}
    slots.update({n: Slot(b, None, tuple(b.shape)) for n, b in model.named_buffers()
                  if b.is_floating_point()})
    steps = {f"{m}.{p}" for m, q in model.named_modules() if isinstance(q, Quantizer)
             for p, _ in q.named_parameters(recurse=False)}
    return Side(name, model, optimizers, slots, steps)


def initialise_ours(model: nn.Module, batches: list, cfg) -> None:
    """Our step-size initialisation, by the protocol the config names."""
    from nulsq.quant import initialize_quantizers

    initialize_quantizers(model, batches, len(batches), protocol=cfg.init.protocol)


# -- building the authors' side ---------------------------------------------------------------


def import_authors(path: str | None):
    """The authors' modules from a clone at `path` (never from this repository)."""
    if not path:
        raise UserError(f"--authors PATH is required: clone {AUTHORS_URL} and pass its folder")
    root = Path(path).expanduser().resolve()
    marker = root / "src" / "quantizer" / "nonuniform" / "nulsq.py"
    if not marker.is_file():
        raise UserError(
            f"{root} is not a clone of the authors' nuLSQ repository (no {marker.relative_to(root)}"
            f" there); get it with: git clone {AUTHORS_URL} {root}"
        )
    sys.path.insert(0, str(root))
    try:
        import src.module_quantization as Q
        import src.utils as U
        from src import initializer, scheduler_optimizer_class
        from src.models.pytorchcv import preresnet_cifar
        from src.quantizer import nonuniform, uniform
    except ImportError as err:
        raise UserError(f"cannot import the authors' code from {root}: {err}") from None
    return {"Q": Q, "U": U, "init": initializer, "opt": scheduler_optimizer_class,
            "models": preresnet_cifar, "uniform": uniform, "nonuniform": nonuniform}


def authors_side(a: dict, method: str, bits: int, fp_state: dict, batches: list, hyper: Hyper,
                 device: torch.device) -> Side:
    """Their pre-act ResNet-20, converted, loaded and initialised as their run_load_model does."""
    Q, U = a["Q"], a["U"]
    quant = {**vars(a["uniform"]), **vars(a["nonuniform"])}
    wq, xq = (quant[n] for n in AUTHORS_QUANTIZERS[method])
    nmse, minmax = a["init"].NMSE_initializer, quant["MinMax_quantizer"]
    common = dict(num_bits=bits, w_grad_scale_mode="none", x_grad_scale_mode="none", weight_norm=None,
                  w_quantizer=wq, x_quantizer=xq, w_initializer=nmse, x_initializer=nmse)
    edge = dict(num_bits=8, w_quantizer=minmax, x_quantizer=minmax, w_initializer=None,
                x_initializer=None, w_grad_scale_mode=None, x_grad_scale_mode=None)
    net = a["models"].preresnet20_cifar10(pretrained=False)
    net = U.replace_module(
        net,
        replacement_dict={nn.Conv2d: partial(Q.QConv2d, **common), nn.Linear: partial(Q.QLinear, **common)},
        exception_dict={"__first__": partial(Q.QConv2d, **edge, first_layer=True),
                        "__last__": partial(Q.QLinear, **edge, first_layer=False)},
        arch="pytorchcv_preresnet20_cifar10",
    ).to(device)
    missing = [k for k in fp_state if k not in net.state_dict()]
    if missing:
        raise UserError(f"the authors' model lacks {len(missing)} of our tensors, e.g. {missing[0]}")
    net.load_state_dict({**net.state_dict(), **fp_state})
    try:
        U.stepsize_init(net, [(x.to(device), y.to(device)) for x, y in batches], device, len(batches))
    finally:
        torch.set_grad_enabled(True)  # their init switches autograd off globally and leaves it off
    sparams, params = U.split_params(net, weight_decay=hyper.weight_decay, lr=hyper.lr,
                                     x_lr=hyper.step_lr, w_lr=hyper.step_lr,
                                     x_wd=hyper.step_weight_decay, w_wd=hyper.step_weight_decay)
    args = U.dotdict(lr=hyper.lr, momentum=hyper.momentum, weight_decay=hyper.weight_decay,
                     nesterov=False, lr_scheduler="CosineAnnealing", nepochs=1)
    opt, _ = a["opt"].scheduler_optimizer_class(args, params, "SGD")
    sopt, _ = a["opt"].scheduler_optimizer_class(args, sparams, "AdamW")
    slots, steps = authors_slots(net, fp_state)
    return Side("authors", net, [opt, sopt], slots, steps)


def authors_name(our_name: str, qn: int) -> tuple[str, object]:
    """(their tensor name, index into it) for one of our quantizer parameters, or (name, None).

    `qn` is the negative step count of the signed quantizer the name belongs to (0 if unsigned)."""
    for ours, theirs in ((".weight_quant.", ".w_scale"), (".act_quant.", ".x_scale")):
        if ours in our_name:
            layer, param = our_name.split(ours)
            if param == "step":
                return layer + theirs, 0
            if param == "neg_steps":
                return layer + theirs, slice(0, qn)
            if param == "pos_steps":
                return layer + theirs, slice(qn, None)
    return our_name, None


def authors_slots(net: nn.Module, fp_state: dict) -> tuple[dict[str, Slot], set[str]]:
    """Our names -> their tensors: the network's by identity, the step sizes by `authors_name`."""
    theirs = dict(net.named_parameters())
    theirs.update(dict(net.named_buffers()))
    slots = {k: Slot(theirs[k], None, tuple(v.shape)) for k, v in fp_state.items()
             if v.is_floating_point()}
    steps = set()
    for layer, m in net.named_modules():
        for role, prefix in (("w", "weight_quant"), ("x", "act_quant")):
            scale = getattr(m, f"{role}_scale", None)
            if not isinstance(scale, nn.Parameter):
                continue
            qn = getattr(m, f"{role}_Qn")
            kind = type(getattr(m, f"{role}_quantizer")).__name__
            names = ["step"] if kind == "LSQ_quantizer" else (
                ["neg_steps", "pos_steps"] if qn > 0 else ["pos_steps"])
            for param in names:
                ours = f"{layer}.{prefix}.{param}"
                _, index = authors_name(ours, qn)
                size = scale[index].numel() if index is not None else scale.numel()
                slots[ours] = Slot(scale, index, () if param == "step" else (size,))
                steps.add(ours)
    return slots, steps


# -- the comparison ---------------------------------------------------------------------------


def relative_differences(a: dict[str, Tensor], b: dict[str, Tensor], steps: set[str]) -> tuple[float, float]:
    """(largest relative difference of the network's tensors, of the step sizes); b is the
    reference. Every name of `b` must be in `a` (a missing one is a mapping error)."""
    net, step = 0.0, 0.0
    for k, ref in b.items():
        diff = (a[k].double() - ref.double()).abs()
        if k in steps:
            step = max(step, float((diff / ref.double().abs().clamp_min(1e-30)).max()))
        elif ref.numel():
            net = max(net, float(diff.max() / ref.double().abs().max().clamp_min(NEAR_ZERO)))
    return net, step


@dataclass
class CaseReport:
    """What one case measured; `ok` says whether it stayed within tolerance."""

    case: str
    init_net: float = 0.0
    init_steps: float = 0.0
    rows: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    top1: tuple[float, float] = (0.0, 0.0)
    agree: float = 1.0
    ok: bool = True
    steps_within: int = 0


def compare(ours: Side, theirs: Side, batches: list, eval_batches: list, steps: int, tol: float,
            step_tol: float, resync: bool = True, case: str = "",
            emit: Callable[[str], None] = print) -> CaseReport:
    """Run `steps` optimizer steps on both sides (cycling `batches`) and report the differences."""
    report = CaseReport(case)
    names = set(theirs.slots) & set(ours.slots)
    if names != set(theirs.slots):
        raise UserError(f"{case}: names on the authors' side with no counterpart in ours: "
                        f"{sorted(set(theirs.slots) - names)[:3]}")
    report.init_net, report.init_steps = relative_differences(ours.state(), theirs.state(), theirs.steps)
    emit(f"{case}: after init  weights/BN rel diff {report.init_net:.2e}  steps rel diff "
         f"{report.init_steps:.2e}")
    emit(f"{'step':>5} {'loss nulsq':>12} {'loss authors':>12} {'loss rel':>9} {'weights':>9} "
         f"{'steps':>9}")
    within = report.init_net <= tol and report.init_steps <= step_tol
    for i in range(steps):
        if resync:
            theirs.load(ours.state())
            theirs.load_optimizer_state(ours.optimizer_state())
        images, labels = batches[i % len(batches)]
        loss_a = ours.train_step(images, labels)
        loss_b = theirs.train_step(images, labels)
        loss_rel = abs(loss_a - loss_b) / max(abs(loss_b), 1e-30)
        net, step = relative_differences(ours.state(), theirs.state(), theirs.steps)
        report.rows.append((i + 1, loss_a, loss_b, net, step))
        good = loss_rel <= tol and net <= tol and step <= step_tol and math.isfinite(loss_a)
        within = within and good
        report.steps_within += int(within)
        emit(f"{i + 1:>5} {loss_a:>12.6f} {loss_b:>12.6f} {loss_rel:>9.1e} {net:>9.1e} {step:>9.1e}"
             f"{'' if good else '  <- beyond tolerance'}")
    if resync:
        theirs.load(ours.state())
    correct_a = correct_b = same = total = 0
    for images, labels in eval_batches:
        pa, pb = ours.predict(images), theirs.predict(images)
        correct_a += int((pa == labels).sum())
        correct_b += int((pb == labels).sum())
        same += int((pa == pb).sum())
        total += labels.numel()
    report.top1 = (100.0 * correct_a / total, 100.0 * correct_b / total)
    report.agree = same / total
    report.ok = report.init_net <= tol and report.init_steps <= step_tol and (
        report.steps_within == steps if not resync else all(
            abs(a - b) / max(abs(b), 1e-30) <= tol and n <= tol and s <= step_tol
            for _, a, b, n, s in report.rows))
    emit(f"{case}: eval top-1 nulsq {report.top1[0]:.2f}% authors {report.top1[1]:.2f}% "
         f"(identical predictions {100 * report.agree:.1f}%); "
         f"{'OK' if report.ok else 'DIVERGED'}"
         + ("" if resync else f"; {report.steps_within}/{steps} steps within tolerance"))
    return report


def synthetic_batches(count: int, batch_size: int, seed: int, device: torch.device) -> list:
    """CIFAR-shaped normalised images and labels from a seed (fixed, no augmentation)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch_size, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 10, (batch_size,), generator=g).to(device)) for _ in range(count)]


def cifar_batches(root: str, count: int, batch_size: int, device: torch.device) -> list:
    """The first count*batch_size CIFAR-10 training images, normalised as pytorchcv expects."""
    from torchvision.datasets import CIFAR10

    try:
        data = CIFAR10(root, train=True, download=False)
    except RuntimeError:
        raise UserError(f"no CIFAR-10 under {root} (expected cifar-10-batches-py/ there)") from None
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    n = count * batch_size
    images = (torch.from_numpy(data.data[:n]).permute(0, 3, 1, 2).float() / 255 - mean) / std
    labels = torch.tensor(data.targets[:n])
    return [(images[i:i + batch_size].to(device), labels[i:i + batch_size].to(device))
            for i in range(0, n, batch_size)]


def run_case(a: dict, method: str, bits: int, args, device: torch.device) -> CaseReport:
    hyper = Hyper(lr=args.lr, step_lr=args.step_lr, weight_decay=args.weight_decay,
                  step_weight_decay=args.step_weight_decay)
    cfg = our_config(method, bits, hyper, args.init_batches)
    make = (partial(cifar_batches, args.data) if args.data else
            partial(synthetic_batches, seed=args.seed))
    batches = make(count=args.init_batches + args.train_batches, batch_size=args.batch_size,
                   device=device)
    init, train = batches[:args.init_batches], batches[args.init_batches:]
    evals = make(count=args.eval_batches, batch_size=args.batch_size, device=device)[-args.eval_batches:]
    torch.manual_seed(args.seed)
    model = build_ours_fp(cfg, device)
    if args.pretrained:
        from nulsq.models.pretrained import read_state_dict

        model.load_state_dict(read_state_dict(args.pretrained), strict=True)
    fp_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    theirs = authors_side(a, method, bits, fp_state, init, hyper, device)
    ours = our_side(cfg, model, init)
    return compare(ours, theirs, train, evals, args.steps, args.tol, args.step_tol,
                   resync=not args.free_run, case=f"{method} {bits}-bit")


def parse(argv: Iterable[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--authors", help=f"a clone of {AUTHORS_URL}")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4], choices=[2, 3, 4])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps compared per case")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--init-batches", type=int, default=4, help="K: batches of the step-size init")
    p.add_argument("--train-batches", type=int, default=5, help="fixed batches the steps cycle over")
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--data", help="a CIFAR-10 root (torchvision layout); default: synthetic tensors")
    p.add_argument("--pretrained", help="FP weights to start both sides from (a state_dict file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=Hyper.lr)
    p.add_argument("--step-lr", type=float, default=Hyper.step_lr)
    p.add_argument("--weight-decay", type=float, default=Hyper.weight_decay)
    p.add_argument("--step-weight-decay", type=float, default=Hyper.step_weight_decay)
    p.add_argument("--tol", type=float, default=1e-4, help="loss and weights (relative)")
    p.add_argument("--step-tol", type=float, default=1e-3, help="step sizes (relative)")
    p.add_argument("--free-run", action="store_true", help="do not re-synchronise before each step")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    return p.parse_args(argv)


def main(argv: Iterable[str] | None = None) -> int:
    args = parse(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is visible; use --device cpu")
        a = import_authors(args.authors)
        device = torch.device(args.device)
        reports = [run_case(a, m, b, args, device) for m in args.methods for b in args.bits]
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    bad = [r.case for r in reports if not r.ok]
    print(f"{len(reports) - len(bad)}/{len(reports)} cases agree within tolerance"
          + (f"; diverged: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
