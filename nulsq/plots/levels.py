"""Learned levels and decision thresholds of every quantizer, over the values it saw.

Each QAT epoch's "quantizers" event holds the levels ("layers") and, from the trainer of this
version on, a fixed-bin histogram per quantizer recorded at evaluation time ("histograms", see
nulsq/log/histograms.py), so the figure needs neither the model nor the dataset.

Layout: one row per quantized layer, the activation quantizer (the layer's input) on the left,
the weight quantizer on the right. Several runs (e.g. LSQ and nuLSQ of the same model) share the
axes: their histograms overlap as outlines, and each run's levels (solid) and thresholds (dotted)
occupy its own horizontal band of the panel, so the grids sit one above the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.patches import Patch

from nulsq.errors import UserError
from nulsq.plots.runs import Run
from nulsq.plots.style import figure_style

ROLES = (("act", "activation value (layer input)"), ("weight", "weight value"))
MAX_LEVEL_LINES = 32  # beyond this (8-bit grids) lines would paint the panel: drawn as a rug instead


@dataclass
class QuantizerView:
    """What the figure draws for one quantizer of one run."""

    name: str
    role: str
    kind: str
    bits: int | None
    levels: list[float]
    thresholds: list[float] | None = None
    range: tuple[float, float] | None = None  # histogram range; None when none was recorded
    counts: list[int] | None = None
    below: int = 0
    above: int = 0

    @property
    def layer(self) -> str:
        """The layer the quantizer belongs to: its module name without the last part."""
        return self.name.rsplit(".", 1)[0] if "." in self.name else self.name


def views_from_event(event: dict[str, Any]) -> dict[str, QuantizerView]:
    """The quantizers of one "quantizers" (or "init") event: levels from "layers", histograms and
    thresholds from "histograms" where recorded."""
    histograms = event.get("histograms") or {}
    layers = event.get("layers") or {}
    views: dict[str, QuantizerView] = {}
    for name in list(layers) + [n for n in histograms if n not in layers]:
        layer = layers.get(name) or {}
        hist = histograms.get(name) or {}
        views[name] = QuantizerView(
            name=name, role=str(layer.get("role") or hist.get("role") or "act"),
            kind=str(layer.get("kind", "")), bits=layer.get("bits"),
            levels=[float(v) for v in layer.get("levels") or []],
            thresholds=hist.get("thresholds"),
            range=tuple(hist["range"]) if hist.get("range") else None,
            counts=hist.get("counts"), below=int(hist.get("below", 0)), above=int(hist.get("above", 0)))
    return views


def recorded_views(run: Run, epoch: int | None = None) -> tuple[dict[str, QuantizerView], int | None]:
    """The quantizers of `run`'s last "quantizers" event (of QAT epoch `epoch` if given).

    Raises:
        UserError: the run logged no such event (not a QAT run, or it has not finished an epoch).
    """
    events = [r for r in run.records if r.get("event") == "quantizers"]
    if epoch is not None:
        events = [r for r in events if r.get("epoch") == epoch]
    if not events:
        which = f" for epoch {epoch}" if epoch is not None else ""
        raise UserError(f"{run.path} has no quantizer record{which}; is it a QAT run with a finished epoch?")
    return views_from_event(events[-1]), events[-1].get("epoch")


def _fractions(view: QuantizerView) -> tuple[list[float], list[float]]:
    """(bin edges, fraction of all values per bin); values outside the range count in the total."""
    lo, hi = view.range
    bins = len(view.counts)
    edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)]
    total = max(sum(view.counts) + view.below + view.above, 1)
    return edges, [c / total for c in view.counts]


def _draw_panel(ax, views: list[tuple[int, QuantizerView]], n_runs: int) -> list[str]:
    """Histograms, levels and thresholds of one quantizer of every run; returns notes to print."""
    notes = []
    smallest = None
    for index, view in views:
        color = f"C{index % 10}"
        if view.counts:
            edges, fractions = _fractions(view)
            ax.stairs(fractions, edges, color=color, fill=n_runs == 1, alpha=0.35 if n_runs == 1 else 0.9,
                      linewidth=1.0, gid="histogram")
            positive = [f for f in fractions if f > 0]
            if positive:
                smallest = min(positive + ([smallest] if smallest else []))
            outside = view.below + view.above
            if outside:
                share = 100 * outside / (sum(view.counts) + outside)
                notes.append(f"{share:.2g}% of values outside the range drawn")
        # Each run's lines in its own band of the panel's height (top: the first run).
        band = (1 - (index + 1) / n_runs, 1 - index / n_runs)
        if len(view.levels) > MAX_LEVEL_LINES:
            band = (band[0], band[0] + 0.06 * (band[1] - band[0]) + 0.04)
        for level in view.levels:
            ax.axvline(level, ymin=band[0], ymax=band[1], color=color, linewidth=1.4, gid="level")
        if len(view.levels) <= MAX_LEVEL_LINES:
            for t in view.thresholds or []:
                ax.axvline(t, ymin=band[0], ymax=band[1], color=color, linewidth=1.0, linestyle=":",
                           gid="threshold")
        if not view.levels:
            notes.append(f"{view.kind}: levels set per batch" if view.kind else "no fixed levels")
    if smallest is not None:
        ax.set_yscale("log")
        ax.set_ylim(bottom=smallest / 2)
    return notes


def levels_figure(runs: list[tuple[str, dict[str, QuantizerView]]], layers: str | None = None,
                  title: str | None = None) -> plt.Figure:
    """One row per quantized layer (activation | weight), every run on the same axes.

    Args:
        runs: (legend label, the run's quantizers by name) per run.
        layers: a regular expression; only layers whose name it finds are drawn.
        title: the figure title.

    Raises:
        UserError: no quantizer to draw (an FP run, or `layers` matches none).
    """
    pattern = re.compile(layers) if layers else None
    rows: dict[str, dict[str, list[tuple[int, QuantizerView]]]] = {}
    for index, (_, views) in enumerate(runs):
        for view in views.values():
            if pattern is not None and not pattern.search(view.layer):
                continue
            rows.setdefault(view.layer, {}).setdefault(view.role, []).append((index, view))
    if not rows:
        raise UserError("no quantizers to plot" + (f" in layers matching '{layers}'" if layers else
                                                   "; is this a quantized (QAT) run?"))
    with figure_style():
        fig, axes = plt.subplots(len(rows), len(ROLES), figsize=(11, 2.4 * len(rows) + 1.0), squeeze=False)
        for row, (layer, by_role) in zip(axes, rows.items()):
            for ax, (role, xlabel) in zip(row, ROLES):
                views = by_role.get(role)
                if not views:
                    ax.axis("off")
                    ax.text(0.5, 0.5, f"{layer}: {role} not quantized", ha="center", va="center",
                            transform=ax.transAxes)
                    continue
                notes = _draw_panel(ax, views, len(runs))
                kinds = sorted({f"{v.kind} {v.bits}-bit" for _, v in views if v.kind and v.bits})
                shown = f" ({', '.join(kinds)})" if len(runs) == 1 and kinds else ""
                ax.set_title(f"{layer} · {role}{shown}")
                ax.set_xlabel(xlabel)
                ax.set_ylabel("fraction of values")
                if notes:
                    ax.text(0.99, 0.97, "\n".join(dict.fromkeys(notes)), ha="right", va="top",
                            transform=ax.transAxes, fontsize=8)
        handles: list[Any] = []
        labels: list[str] = []
        if len(runs) > 1 or runs[0][0]:
            for index, (label, _) in enumerate(runs):
                handles.append(Patch(facecolor=f"C{index % 10}", alpha=0.6))
                labels.append(label)
        handles += [Patch(facecolor="0.6", alpha=0.5), plt.Line2D([], [], color="0.2", linewidth=1.4),
                    plt.Line2D([], [], color="0.2", linewidth=1.0, linestyle=":")]
        labels += ["values the quantizer saw at evaluation", "learned levels",
                   "decision thresholds (midpoints; nearest-level quantizers)"]
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()) if title else None)
    return fig
