"""The learned levels and decision thresholds of every weight and activation quantizer, over the
histogram of the values it saw; or, for an export folder (scripts/export.py), every layer's weight
levels (bar height: the fraction of its weights coded to each) and activation levels and thresholds,
read from the export alone.

    python scripts/plot_levels.py runs/table5_resnet18_2bit/nulsq_a_2bit_seed0/20250101-120000
    python scripts/plot_levels.py runs/.../lsq_2bit_seed0/... runs/.../nulsq_a_2bit_seed0/... --layers layer1
    python scripts/plot_levels.py exports/r18_nulsq_wa --out levels.png

Reads the histograms the trainer records at every QAT epoch's evaluation (metrics.jsonl), so it
needs neither the model nor the dataset; several runs are drawn on the same axes. A run recorded
before histograms were logged falls back to loading its last checkpoint on the CPU and pushing
--batches validation batches through it (then the dataset must be at hand). The drawing lives in
nulsq/plots/levels.py.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

from nulsq.cli import script_exit_code
from nulsq.errors import UserError
from nulsq.log import METRICS_FILE, quantizer_snapshot
from nulsq.log.histograms import record_histograms, tensor_histogram
from nulsq.plots.levels import QuantizerView, levels_figure, recorded_views, views_from_event
from nulsq.plots.paper import DEFAULT_PAPER, load_paper_or_none, method_labels
from nulsq.plots.runs import group_runs, load_run
from nulsq.plots.style import add_format_argument, output_path, save_figure
from nulsq.quant.base import Quantizer

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


def draw_levels(layers: dict[str, tuple[torch.Tensor, list[float]]], out: Path,
                fmt: str | None = None) -> Path:
    """One panel per activation quantizer: the histogram of `values` and its `levels`.

    Args:
        layers: quantizer name -> (sample of its input values, its levels).
        out: the figure to write.
    """
    if not layers:
        raise UserError("no activation quantizers to plot; is this a quantized (QAT) run?")
    views = {name: QuantizerView(name, "act", "", None, list(levels),
                                 **_hist_fields(tensor_histogram(values, torch.tensor(levels))))
             for name, (values, levels) in layers.items()}
    return save_figure(levels_figure([("", views)]), output_path(out, fmt))


def _hist_fields(record: dict) -> dict:
    return {"range": tuple(record["range"]), "counts": record["counts"], "below": record["below"],
            "above": record["above"]}


def captured_views(run_dir: Path, batches: int) -> dict[str, QuantizerView]:
    """Load `run_dir`'s model on the CPU and record histograms on `batches` validation batches."""
    from nulsq.data import build as build_data  # the trainer's own loaders, as in training
    from nulsq.rundir import load_run as load_checkpoint_run

    model, cfg = load_checkpoint_run(run_dir)
    data = build_data(cfg.dataset, torch.device("cpu"), int(cfg.trainer.seed))
    images = (x for i, (x, _) in zip(range(batches), data.val))
    return views_from_event({**quantizer_snapshot(model), **record_histograms(model, images)})


def run_views(run_dir: Path, batches: int, epoch: int | None) -> dict[str, QuantizerView]:
    """The recorded quantizers of a run; the checkpoint-and-data fallback when none were recorded."""
    if (run_dir / METRICS_FILE).is_file():
        views, _ = recorded_views(load_run(run_dir), epoch)
        if any(v.counts for v in views.values()) or not (run_dir / "checkpoints" / "last.pt").is_file():
            return views
    return captured_views(run_dir, batches)


def plot_levels(run_dirs: list[Path], out: Path, batches: int = 4, epoch: int | None = None,
                layers: str | None = None, fmt: str | None = None) -> Path:
    """Draw every quantizer of `run_dirs` into `out`; returns the path written."""
    paper = load_paper_or_none(DEFAULT_PAPER, explicit=False)
    labels = [""]
    if len(run_dirs) > 1:  # legend entries that tell the runs apart (method, bits, seed, settings)
        runs = [load_run(d) for d in run_dirs]
        by_run = {id(r): g.label for g in group_runs(runs, ["method", "bits", "seed"], method_labels(paper))
                  for r in g.runs}
        labels = [by_run[id(r)] for r in runs]
    views = [(label, run_views(Path(d), batches, epoch)) for label, d in zip(labels, run_dirs)]
    title = None if len(run_dirs) > 1 else Path(run_dirs[0]).name
    return save_figure(levels_figure(views, layers, title), output_path(out, fmt))


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
            ax.legend(fontsize=8)
        ax.set_title(f"{entry['name']}: weights", fontsize=8)
        ax.set_xlabel("weight value", fontsize=8)
        ax.set_ylabel("fraction of weights", fontsize=8)
        ax.tick_params(labelsize=8)
        ax = next(panels)
        title = f"{entry['name']}: activations"
        if act.get("levels") is not None:
            for i, level in enumerate(act["levels"]):
                ax.axvline(level, color="tab:red", linewidth=1.2,
                           label=f"{act['kind']} {act['bits']}b levels" if i == 0 else None)
            for i, t in enumerate(act["thresholds"]):
                ax.axvline(t, color="tab:gray", linewidth=0.8, linestyle=":",
                           label="decision thresholds" if i == 0 else None)
            ax.legend(fontsize=8)
        elif act.get("dynamic"):
            title += f"\n{act['kind']} {act['bits']}b: scale from each input ({act.get('convention')})"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel("activation value", fontsize=8)
        ax.set_yticks([])
        ax.tick_params(labelsize=8)
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
    parser.add_argument("run_dirs", nargs="+", type=Path,
                        help="run directories (LSQ vs nuLSQ: give both), or one export folder")
    parser.add_argument("--epoch", type=int, default=None, help="QAT epoch to draw (default: the last)")
    parser.add_argument("--layers", default=None, help="regular expression: only the layers it finds")
    parser.add_argument("--batches", type=int, default=4,
                        help="validation batches, for runs recorded without histograms")
    parser.add_argument("--out", type=Path, default=Path("levels.png"), help="the figure to write")
    add_format_argument(parser)
    args = parser.parse_args(argv)
    if len(args.run_dirs) == 1 and (args.run_dirs[0] / "manifest.json").is_file():  # an export
        out = output_path(args.out, args.format)
        return script_exit_code(lambda: plot_export(args.run_dirs[0], out), f"wrote {out}")
    return script_exit_code(
        lambda: plot_levels(args.run_dirs, args.out, args.batches, args.epoch, args.layers, args.format),
        f"wrote {output_path(args.out, args.format)}")


if __name__ == "__main__":
    sys.exit(main())
