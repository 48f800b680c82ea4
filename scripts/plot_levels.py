"""The learned quantization levels of every activation quantizer, over its input's histogram.

    python scripts/plot_levels.py runs/table5_resnet18_2bit/nulsq_a_2bit_seed0/20250101-120000

Loads the run's last checkpoint on the CPU, pushes a few validation batches through it while
forward pre-hooks on the activation quantizers record what each one receives, and draws one panel
per layer: the histogram of those inputs with a vertical line at each level.
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
        ax.hist(values.numpy(), bins=100, color="tab:blue", alpha=0.6, log=True)
        for level in levels:
            ax.axvline(level, color="tab:red", linewidth=1)
        # Quantizers such as dynamic max have no fixed levels: they depend on each batch.
        ax.set_title(f"{name} ({len(levels) or 'per-batch'} levels)", fontsize=8)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory with checkpoints/last.pt")
    parser.add_argument("--batches", type=int, default=4, help="validation batches to capture")
    parser.add_argument("--out", type=Path, default=Path("levels.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    return script_exit_code(lambda: plot_run(args.run_dir, args.batches, args.out),
                            f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
