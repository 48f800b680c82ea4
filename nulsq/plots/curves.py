"""Validation top-1 and training loss per epoch, pooled over seeds: mean line and a band.

One legend entry per group of runs (runs/groups: same settings except the seed). The QAT stage has
its own axis starting at epoch 1; the FP pretraining stage of the embedded demo is drawn only on
request, in its own shaded column. A run without a QAT stage (an FP-only run) is drawn on the main
axis and says so in its label. Where a group's runs all belong to one cell of a paper table, the
published top-1 is a dashed line in the group's colour.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator
from omegaconf import OmegaConf

from nulsq.errors import UserError
from nulsq.plots.paper import load_paper_or_none, method_labels, published_top1, table_cell
from nulsq.plots.runs import Group, group_runs, load_run
from nulsq.plots.style import figure_style, output_path, save_figure

PANELS = (("val/top1", "validation top-1 (%)"), ("train/loss", "training loss (cross-entropy)"))
BANDS = {"std": "mean ± 1 std over seeds", "minmax": "mean, min-max over seeds"}
FP_SHADE = "#f2f2f2"
# config key -> how its value reads in run_label
LEGEND = {"experiment": "{}", "quantizer.name": "{}", "quantizer.bits": "{}bit", "trainer.seed": "seed{}"}


def run_label(run_dir: Path) -> str:
    """'experiment / method / bits / seed' from config.yaml; keys that are missing are left out."""
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        return run_dir.name
    cfg = OmegaConf.load(cfg_path)
    values = {key: OmegaConf.select(cfg, key, default=None) for key in LEGEND}
    parts = [fmt.format(values[key]) for key, fmt in LEGEND.items() if values[key] is not None]
    return " / ".join(parts) or run_dir.name


def epoch_curves(records: list[dict[str, Any]], key: str) -> dict[str, tuple[list[int], list[float]]]:
    """Per training stage ("fp", "qat"), the epochs and values of `key` from "epoch" events.

    A resumed run may log an epoch twice; the later record wins. NaN and missing values are dropped.
    """
    by_stage: dict[str, dict[int, float]] = {}
    for record in records:
        if record.get("event") != "epoch" or record.get(key) is None:
            continue
        value = float(record[key])
        if math.isfinite(value):
            by_stage.setdefault(str(record.get("stage", "")), {})[int(record["epoch"])] = value
    return {stage: (sorted(v), [v[e] for e in sorted(v)]) for stage, v in by_stage.items()}


@dataclass
class Pooled:
    """One group's curve: per epoch the mean over its runs, the band edges, and how many runs."""

    epochs: list[int]
    mean: list[float]
    low: list[float]
    high: list[float]
    n: list[int]


def pool(curves: list[tuple[list[int], list[float]]], band: str) -> Pooled:
    """Mean over runs per epoch (each epoch over the runs that reached it), with the band edges:
    mean ± sample std ("std") or min/max ("minmax"); a single run's band is its line."""
    if band not in BANDS:
        raise UserError(f"unknown band '{band}'; valid: {', '.join(BANDS)}")
    per_epoch: dict[int, list[float]] = {}
    for epochs, values in curves:
        for e, v in zip(epochs, values):
            per_epoch.setdefault(e, []).append(v)
    out = Pooled([], [], [], [], [])
    for e in sorted(per_epoch):
        v = per_epoch[e]
        mean = statistics.fmean(v)
        if band == "std":
            spread = statistics.stdev(v) if len(v) > 1 else 0.0
            low, high = mean - spread, mean + spread
        else:
            low, high = min(v), max(v)
        out.epochs.append(e)
        out.mean.append(mean)
        out.low.append(low)
        out.high.append(high)
        out.n.append(len(v))
    return out


def _main_stage(group: Group) -> str:
    """"qat", or "fp" for groups of FP-only runs (no quantizer in the config, no QAT epoch logged)."""
    for run in group.runs:
        quantizer = run.cfg.get("quantizer") or {}
        if quantizer.get("weight") is not None or quantizer.get("act") is not None:
            return "qat"
        if any(r.get("event") == "epoch" and r.get("stage") == "qat" for r in run.records):
            return "qat"
    return "fp"


def _draw(ax, pooled: Pooled, color: str) -> None:
    """The mean line (markers while the epochs are few enough to tell apart) and, over several
    runs, the band."""
    marker = "o" if len(pooled.epochs) <= 30 else None
    ax.plot(pooled.epochs, pooled.mean, color=color, marker=marker, markersize=3, gid="mean")
    if max(pooled.n, default=1) > 1:
        ax.fill_between(pooled.epochs, pooled.low, pooled.high, color=color, alpha=0.2, linewidth=0,
                        gid="band")


def curves_figure(run_dirs: list[Path], group_by: list[str] | None = None, band: str = "std",
                  show_fp: bool = False, paper: dict[str, dict] | None = None) -> plt.Figure:
    """The figure: one row of panels (top-1, loss) for QAT, and a shaded FP column if `show_fp`.

    Args:
        run_dirs: run directories (metrics.jsonl; config.yaml names and groups them).
        group_by: --group-by names (default method and bits); other differing settings split too.
        band: "std" or "minmax" (see `pool`).
        show_fp: also draw the FP pretraining stage, in its own column.
        paper: results/paper.yaml's tables, for the published top-1 lines; None for none.
    """
    if band not in BANDS:
        raise UserError(f"unknown band '{band}'; valid: {', '.join(BANDS)}")
    runs = [load_run(Path(d)) for d in run_dirs]
    groups = group_runs(runs, list(group_by or ["method", "bits"]), method_labels(paper))
    stages = ["fp", "qat"] if show_fp else ["qat"]
    with figure_style():
        fig, axes = plt.subplots(
            len(PANELS), len(stages), figsize=(3.2 + 3.3 * len(stages), 3.0 * len(PANELS)),
            squeeze=False, sharex="col",
            gridspec_kw={"width_ratios": [0.6, 1.0] if show_fp else [1.0]})
        axes = {(key, stage): axes[i][j]
                for i, (key, _) in enumerate(PANELS) for j, stage in enumerate(stages)}
        handles, labels = [], []
        for index, group in enumerate(groups):
            color = f"C{index % 10}"
            main = _main_stage(group)
            seeds = len(group.runs)
            label = group.label + (" (FP run)" if main == "fp" else "")
            label += f", {seeds} seeds" if seeds > 1 else ""
            for key, _ in PANELS:
                per_run = [epoch_curves(run.records, key) for run in group.runs]
                for stage in stages:
                    source = main if stage == "qat" else ("fp" if main == "qat" else None)
                    curves = [c[source] for c in per_run if source in c]
                    if curves:
                        _draw(axes[(key, stage)], pool(curves, band), color)
            line = plt.Line2D([], [], color=color, marker="o", markersize=3)
            handles.append(line)
            labels.append(label)
            cells = {table_cell(run.cfg) for run in group.runs}
            published = published_top1(paper, cells.pop()) if len(cells) == 1 else None
            if published is not None:
                axes[("val/top1", "qat")].axhline(published, color=color, linestyle="--", linewidth=1.2,
                                                  gid="paper")
                handles.append(plt.Line2D([], [], color=color, linestyle="--", linewidth=1.2))
                labels.append(f"{group.label}: published {published:g}%")
        for (key, stage), ax in axes.items():
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if key == PANELS[-1][0]:
                ax.set_xlabel("FP pretraining epoch" if stage == "fp" else "QAT epoch")
            if stage == stages[0]:
                ax.set_ylabel(dict(PANELS)[key])
            if stage == "fp":
                ax.set_facecolor(FP_SHADE)
                if key == PANELS[0][0]:
                    ax.set_title("FP pretraining (before QAT)")
            elif show_fp and key == PANELS[0][0]:
                ax.set_title("quantization-aware training")
        if not handles:
            raise UserError("no runs to plot")
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(2, len(handles)), title=BANDS[band], frameon=False)
        common = _common_title(runs)
        if common:
            fig.suptitle(common)
        fig.tight_layout()
    return fig


def _common_title(runs) -> str:
    """Model and dataset when every run shares them ("preresnet20 on cifar10"), else ""."""
    models = {r.get("model.name") for r in runs}
    datasets = {r.get("dataset.name") for r in runs}
    if len(models) != 1 or None in models:
        return ""
    title = str(models.pop())
    if len(datasets) == 1 and None not in datasets:
        title += f" on {datasets.pop()}"
    return title


def plot_curves(run_dirs: list[Path], out: Path, group_by: list[str] | None = None, band: str = "std",
                show_fp: bool = False, paper_path: Path | None = None, paper_explicit: bool = False,
                fmt: str | None = None) -> Path:
    """Draw `curves_figure` and write it to `out` (suffix from `fmt`); returns the path written."""
    path = output_path(out, fmt)
    paper = load_paper_or_none(paper_path, paper_explicit)
    return save_figure(curves_figure(run_dirs, group_by, band, show_fp, paper), path)
