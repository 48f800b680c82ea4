"""The learned quantization levels: of every activation quantizer over its input's histogram (a
run directory), or of every weight and activation quantizer (an export folder).

    python scripts/plot_levels.py runs/table5_resnet18_2bit/nulsq_a_2bit_seed0/20250101-120000
    python scripts/plot_levels.py exports/r18_nulsq_wa --out levels.png

A run directory: loads the run's last checkpoint on the CPU, pushes a few validation batches
through it while forward pre-hooks on the activation quantizers record what each one receives,
and draws one panel per layer: the histogram of those inputs with a vertical line at each level.
An export folder (scripts/export.py): needs no model nor data; one panel per quantized layer with
the weight levels (bar height: the fraction of the layer's weights coded to that level), the
activation levels and the activation decision thresholds, all read from the export.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from nulsq.cli import script_exit_code  # noqa: E402
from nulsq.errors import UserError  # noqa: E402
from nulsq.quant.base import Quantizer  # noqa: E402

# Inputs kept per layer and batch: enough for a smooth histogram, small for the largest models.
MAX_VALUES_PER_BATCH = 20_000


def capture_act_inputs(
    model: nn.Module, batches: Iterable[torch.Tensor], max_values: int = MAX_VALUES_PER_BATCH
) -> dict[str, torch.Tensor]:
    """What each activation quantizer (role "act") receives, over all `batches`, as 1-D CPU tensors.

    Args:
        model: the quantized network, in eval mode.
        batches: input images; each is run through `model` once under no_grad.
        max_values: per layer and batch, a random subset of at most this many values is kept.
    """
    captured: dict[str, list[torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(0)  # the same subset on every call

    def hook_for(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1).float().cpu()
            if x.numel() > max_values:
                x = x[torch.randperm(x.numel(), generator=generator)[:max_values]]
            captured.setdefault(name, []).append(x)

        return record

    handles = [
        m.register_forward_pre_hook(hook_for(name))
        for name, m in model.named_modules()
        if isinstance(m, Quantizer) and m.role == "act"
    ]
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts) for name, parts in captured.items()}


def act_levels(model: nn.Module) -> dict[str, list[float]]:
    """The levels of every activation quantizer of `model`, by module name."""
    return {
        name: m.levels().detach().float().cpu().tolist()
        for name, m in model.named_modules()
        if isinstance(m, Quantizer) and m.role == "act"
    }


def draw_levels(layers: dict[str, tuple[torch.Tensor, list[float]]], out: Path, cols: int = 4) -> None:
    """One panel per layer: histogram of its input values, a vertical line at each level.

    Args:
        layers: layer name -> (sample of the quantizer's input values, its levels).
        out: the PNG to write.
        cols: panels per row.
    """
    if not layers:
        raise UserError("no activation quantizers to plot; is this a quantized (QAT) run?")
    cols = min(cols, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, (name, (values, levels)) in zip(axes.flat, layers.items()):
        ax.hist(values.numpy(), bins=100, color="tab:blue", alpha=0.6, log=True, label="inputs")
        for i, level in enumerate(levels):
            ax.axvline(level, color="tab:red", linewidth=1, label="levels" if i == 0 else None)
        # Quantizers such as dynamic max have no fixed levels: they depend on each batch.
        ax.set_title(f"{name} ({len(levels) or 'per-batch'} levels)", fontsize=8)
        ax.set_xlabel("activation value", fontsize=7)
        ax.set_ylabel("count (log)", fontsize=7)
        ax.legend(fontsize=6)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_run(run_dir: Path, batches: int, out: Path) -> None:
    """Load `run_dir`'s model, capture `batches` validation batches, and draw the levels."""
    from nulsq.data import build as build_data  # the trainer's own loaders, as in training
    from nulsq.rundir import load_run

    model, cfg = load_run(run_dir)
    data = build_data(cfg.dataset, torch.device("cpu"), int(cfg.trainer.seed))
    images = (x for i, (x, _) in zip(range(batches), data.val))
    inputs = capture_act_inputs(model, images)
    levels = act_levels(model)
    draw_levels({name: (inputs[name], levels[name]) for name in inputs}, out)


def weight_code_fractions(manifest: dict, tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per quantized layer, the fraction of its weights at each level (from the packed codes)."""
    from nulsq.export.runtime import decode_weight

    fractions = {}
    for entry in manifest["layers"]:
        spec = entry["weight"]
        if spec.get("levels") is None:
            continue
        codes, _ = decode_weight(entry, tensors)
        counts = torch.bincount((codes - spec["code_min"]).reshape(-1), minlength=len(spec["levels"]))
        fractions[entry["name"]] = (counts.float() / max(codes.numel(), 1)).tolist()
    return fractions


def draw_export_levels(manifest: dict, fractions: dict[str, list[float]], out: Path, cols: int = 4) -> None:
    """Two panels per quantized layer of an export: its weight levels (bars: the fraction of the
    weights coded to each), and its activation levels and thresholds (vertical lines). Dynamic
    8-bit activations have no fixed levels (their step comes from each input): noted, not drawn."""
    layers = manifest["layers"]
    if not layers:
        raise UserError("the export has no quantized layer to plot")
    cols = min(cols, 2 * len(layers))
    rows = math.ceil(2 * len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    panels = iter(axes.flat)
    for entry in layers:
        weight, act = entry["weight"], entry["act"]
        ax = next(panels)
        if weight.get("levels") is not None:
            levels = weight["levels"]
            width = 0.6 * min((b - a for a, b in zip(levels, levels[1:])), default=1.0)
            ax.bar(levels, fractions.get(entry["name"], [0.0] * len(levels)), width=width,
                   color="tab:blue", alpha=0.7, label=f"{weight['kind']} {weight['bits']}b levels")
            ax.legend(fontsize=6)
        ax.set_title(f"{entry['name']}: weights", fontsize=8)
        ax.set_xlabel("weight value", fontsize=7)
        ax.set_ylabel("fraction of weights", fontsize=7)
        ax.tick_params(labelsize=7)
        ax = next(panels)
        title = f"{entry['name']}: activations"
        if act.get("levels") is not None:
            for i, level in enumerate(act["levels"]):
                ax.axvline(level, color="tab:red", linewidth=1.2,
                           label=f"{act['kind']} {act['bits']}b levels" if i == 0 else None)
            for i, t in enumerate(act["thresholds"]):
                ax.axvline(t, color="tab:gray", linewidth=0.8, linestyle=":",
                           label="decision thresholds" if i == 0 else None)
            ax.legend(fontsize=6)
        elif act.get("dynamic"):
            title += f"\n{act['kind']} {act['bits']}b: step = max|x|/Qp of each input"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("activation value", fontsize=7)
        ax.set_yticks([])
        ax.tick_params(labelsize=7)
    for ax in panels:
        ax.axis("off")
    fig.suptitle(f"{manifest['model']['name']} / {manifest['method']['name']} "
                 f"{manifest['method']['bits']}-bit: learned levels", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the suptitle
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_export(folder: Path, out: Path) -> None:
    """Draw the weight and activation levels of an export folder (no model, no data)."""
    from nulsq.export.format import read_export

    manifest, tensors = read_export(folder)
    draw_export_levels(manifest, weight_code_fractions(manifest, tensors), out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path,
                        help="a run directory with checkpoints/last.pt, or an export folder (manifest.json)")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to capture (runs)")
    parser.add_argument("--out", type=Path, default=Path("levels.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    if (args.source / "manifest.json").is_file():
        return script_exit_code(lambda: plot_export(args.source, args.out), f"wrote {args.out}")
    return script_exit_code(lambda: plot_run(args.source, args.batches, args.out),
                            f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
