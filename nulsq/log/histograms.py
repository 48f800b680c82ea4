"""What each quantizer sees at evaluation time, as a small fixed-bin histogram per quantizer.

Logged with every QAT epoch's "quantizers" event (key "histograms"), so that
scripts/plot_levels.py draws the learned levels over the distribution they quantize without the
model or the dataset. Per quantizer (activations: the layer input; weights: the weight tensor):

    {"role", "range": [lo, hi], "counts": [HISTOGRAM_BINS ints], "below": int, "above": int,
     "batches": int, "thresholds": [float] | None}

The range is fixed on the first batch (its finite minimum and maximum, widened to contain every
level), so the batches add up bin by bin on the device and one transfer at the end brings all
histograms to the host. Values of later batches outside the range are counted in "below" and
"above". A weight is the same tensor in every batch of an evaluation, so it is counted once.
Tensors larger than MAX_VALUES are sampled (see `sample_values`): the counts are then of the sample.

"thresholds" are the quantizer's decision thresholds in its input's units where they follow from
its levels: the midpoints between adjacent levels for the quantizers that round their (not
normalised) input to the nearest level. None otherwise: LCQ rounds in a companded domain,
DoReFa weights pass through tanh, APoT/LCQ/ternary weights are standardised first, and dynamic max
has no fixed levels.
"""

from __future__ import annotations

from itertools import islice
from typing import Any, Iterable

import torch
from torch import nn

from nulsq.module_names import strip_wrappers
from nulsq.quant.base import Quantizer

HISTOGRAM_BINS = 64
HISTOGRAM_BATCHES = 4  # validation batches per evaluation: enough for a smooth histogram, cheap
# Values histogrammed per quantizer and batch: a larger tensor (an early ImageNet activation holds
# 200M) is sampled at an even prime stride, which no power-of-two, 3 or 7 tensor dimension aliases.
MAX_VALUES = 2**22
NEAREST_LEVEL_KINDS = frozenset({"lsq", "nulsq", "lqnets", "pact", "apot", "ternary", "dorefa"})


def decision_thresholds(q: Quantizer) -> list[float] | None:
    """Midpoints between adjacent levels of a nearest-level quantizer of its raw input, else None."""
    if q.kind not in NEAREST_LEVEL_KINDS or getattr(q, "weight_norm", "none") != "none":
        return None
    if q.kind == "dorefa" and q.role == "weight":  # tanh-normalised input
        return None
    levels = q.levels().detach().float().cpu()
    if levels.numel() < 2:
        return None
    return ((levels[1:] + levels[:-1]) / 2).tolist()


def _next_prime(n: int) -> int:
    def is_prime(k: int) -> bool:
        return k > 1 and all(k % d for d in range(2, int(k**0.5) + 1))

    while not is_prime(n):
        n += 1
    return n


def sample_values(x: torch.Tensor, max_values: int = MAX_VALUES) -> torch.Tensor:
    """`x` flattened in its memory order (no copy for contiguous or channels-last tensors), as float
    32, every p-th value (p prime, above 7) when it holds more than `max_values`."""
    x = x.detach()
    if x.is_contiguous():
        flat = x.view(-1)
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        flat = x.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC is the memory order
    else:
        flat = x.reshape(-1)
    if flat.numel() > max_values:
        flat = flat[:: _next_prime(max(11, -(-flat.numel() // max_values)))]
    return flat.float()


class _Histogram:
    """One quantizer's running histogram, kept on the input's device."""

    def __init__(self, x: torch.Tensor, levels: torch.Tensor, bins: int) -> None:
        finite = x[torch.isfinite(x)]
        lo, hi = (torch.stack([finite.min(), finite.max()]).tolist() if finite.numel() else (0.0, 1.0))
        if levels.numel():
            lo, hi = min(lo, float(levels.min())), max(hi, float(levels.max()))
        if hi <= lo:  # a constant input: a unit-wide range around it
            lo, hi = lo - 0.5, hi + 0.5
        self.lo, self.hi, self.bins = lo, hi, bins
        self.counts = torch.zeros(bins, device=x.device)
        self.outside = torch.zeros(2, device=x.device)  # below, above
        self.batches = 0

    def add(self, x: torch.Tensor) -> None:
        self.counts += torch.histc(x, self.bins, self.lo, self.hi)
        self.outside += torch.stack([(x < self.lo).sum(), (x > self.hi).sum()]).float()
        self.batches += 1

    def record(self, host: list[float]) -> dict[str, Any]:
        """The JSON record, from `host`: counts then below, above, already on the host."""
        values = [int(round(v)) for v in host]
        return {"range": [self.lo, self.hi], "counts": values[: self.bins], "below": values[self.bins],
                "above": values[self.bins + 1], "batches": self.batches}


def tensor_histogram(x: torch.Tensor, levels: torch.Tensor | None = None,
                     bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """The histogram record (range, counts, below, above, batches) of one tensor of values."""
    x = sample_values(x)
    h = _Histogram(x, torch.empty(0) if levels is None else levels.detach().float().cpu(), bins)
    h.add(x)
    return h.record(torch.cat([h.counts, h.outside]).tolist())


def record_histograms(model: nn.Module, batches: Iterable[torch.Tensor], bins: int = HISTOGRAM_BINS,
                      autocast=None) -> dict[str, Any]:
    """Run `batches` through `model` (no_grad) and histogram what every Quantizer receives.

    Args:
        model: the quantized network, unwrapped (forward pre-hooks go on its quantizers); it is run
            in eval mode and put back in the mode it was in.
        batches: input images, each run through `model` once.
        bins: bins per histogram.
        autocast: a context-manager factory the forward runs under (the trainer's mixed precision),
            so the quantizers see what evaluation feeds them; None for none.

    Returns:
        {"histograms": {quantizer name: record (module docstring)}}, in module order.
    """
    quantizers = [(strip_wrappers(n), m) for n, m in model.named_modules() if isinstance(m, Quantizer)]
    running: dict[str, _Histogram] = {}

    def hook_for(name: str, q: Quantizer):
        def record(module: nn.Module, args: tuple) -> None:
            if q.role == "weight" and name in running:
                return  # the same weight in every batch: counted once
            x = sample_values(args[0])
            if name not in running:
                running[name] = _Histogram(x, q.levels().detach().float(), bins)
            running[name].add(x)

        return record

    handles = [q.register_forward_pre_hook(hook_for(name, q)) for name, q in quantizers]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images in batches:
                if autocast is None:
                    model(images)
                else:
                    with autocast():
                        model(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    names = [name for name, _ in quantizers if name in running]
    if not names:
        return {"histograms": {}}
    # One host transfer per device for all histograms, not two per quantizer.
    flat = torch.cat([torch.cat([running[n].counts, running[n].outside]).cpu() for n in names]).tolist()
    out: dict[str, Any] = {}
    by_name = dict(quantizers)
    for i, name in enumerate(names):
        q = by_name[name]
        out[name] = {"role": q.role, **running[name].record(flat[i * (bins + 2) : (i + 1) * (bins + 2)]),
                     "thresholds": decision_thresholds(q)}
    return {"histograms": out}


def eval_histograms(model: nn.Module, loader, runtime=None, dist=None,
                    batches: int = HISTOGRAM_BATCHES) -> dict[str, Any]:
    """`record_histograms` over the first `batches` batches of the validation `loader`.

    The trainer calls it when it logs the "quantizers" event of a QAT epoch, on the unwrapped
    model (no DDP, no torch.compile: hooks on a compiled graph would recompile it every epoch).
    Only rank 0 logs, so the other ranks skip the work and return {}.

    Args:
        model: the unwrapped quantized network.
        loader: yields (images, labels) already on the model's device.
        runtime: the trainer's Runtime (its `autocast`), or None.
        dist: the trainer's DistInfo, or None (one process).
        batches: how many batches to histogram.
    """
    if dist is not None and not dist.is_main:
        return {}
    # A torch DataLoader draws its workers' base seed from the global CPU generator when iterated:
    # put it back, so that recording a histogram never changes what the training does next.
    rng = torch.get_rng_state()
    try:
        images = (x for x, _ in islice(loader, batches))
        return record_histograms(model, images, autocast=None if runtime is None else runtime.autocast)
    finally:
        torch.set_rng_state(rng)
