"""A results table as a figure: per row our mean ± std beside the published number, Δ annotated.

    results/table<id>.png, written by scripts/make_tables.py next to results/table<id>.md

One panel per model (accuracies of different models differ by tens of points); one line per
(method, bit width) that has our result or a published number: ours as a dot with a ± 1 std bar
(sample std over seeds), the published number as a hollow diamond, and at the right the
difference ours - published and the number of seeds.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import matplotlib.pyplot as plt

import nulsq.results as tables  # a module, not names: nulsq.results may import this module
from nulsq.errors import UserError
from nulsq.plots.style import figure_style, output_path, save_figure

OURS_COLOR, PAPER_COLOR = "C0", "C3"


@dataclass(frozen=True)
class FigureRow:
    """One line of the figure."""

    model: str
    method: str  # as the paper writes it
    bits: int
    mean: float | None  # ours; None: not run
    std: float | None  # None for a single run
    n: int
    published: float | None  # None: not published

    @property
    def diff(self) -> float | None:
        if self.mean is None or self.published is None:
            return None
        return round(self.mean - self.published, 2) + 0.0  # + 0.0: no "-0.00"


def table_rows(table: str, paper_table: Mapping[str, Any] | None,
               cells: Mapping[tuple, Any]) -> list[FigureRow]:
    """The figure's rows from what make_tables aggregated.

    Args:
        table: the table id.
        paper_table: its entry of results/paper.yaml (rows, labels, bits), or None.
        cells: {(table, model, row, bits): cell with .n, .mean, .std} (nulsq.results.aggregate).

    Returns:
        Rows in the paper's order (models, then bits, then methods), ours-only rows after; a row
        with neither our result nor a published number is left out.
    """
    paper_table = paper_table or {}
    rows = paper_table.get("rows") or {}
    labels = paper_table.get("labels") or {}
    ours = {k: c for k, c in cells.items() if k[0] == table}
    bits = sorted(set(paper_table.get("bits") or []) | {k[3] for k in ours})
    out = []
    for model in tables._ordered(rows, (k[1] for k in ours)):
        model_rows = rows.get(model) or {}
        names = tables._ordered(model_rows, (k[2] for k in ours if k[1] == model))
        for b in bits:
            for name in names:
                cell = ours.get((table, model, name, b))
                published = tables.published_mean((model_rows.get(name) or {}).get(b))
                if cell is None and published is None:
                    continue
                out.append(FigureRow(model, str(labels.get(name, name)), int(b),
                                     None if cell is None else float(cell.mean),
                                     None if cell is None or cell.std is None else float(cell.std),
                                     0 if cell is None else int(cell.n), published))
    return out


def _note(row: FigureRow) -> str:
    if row.mean is None:
        return "not run"
    seeds = f"n={row.n}"
    if row.published is None:
        return f"{seeds}, not published"
    return f"Δ {row.diff:+.2f}  ({seeds})"


def results_figure(rows: list[FigureRow], title: str | None = None) -> plt.Figure:
    """The dot plot of `rows` (see the module docstring).

    Raises:
        UserError: `rows` is empty.
    """
    if not rows:
        raise UserError("no results to draw: no run and no published number in this table")
    models = list(dict.fromkeys(r.model for r in rows))
    per_model = [[r for r in rows if r.model == m] for m in models]
    with figure_style():
        height = 1.2 + 0.38 * len(rows) + 0.7 * len(models)
        fig, axes = plt.subplots(len(models), 1, squeeze=False, figsize=(8, height),
                                 gridspec_kw={"height_ratios": [len(p) + 1 for p in per_model]})
        for ax, model, model_rows in zip(axes[:, 0], models, per_model):
            y = list(range(len(model_rows)))[::-1]  # the first row on top
            for yi, row in zip(y, model_rows):
                if row.diff is not None:  # a thin connector: the gap the Δ note measures
                    ax.plot([row.mean, row.published], [yi, yi], color="0.6", linewidth=1, zorder=1)
                if row.mean is not None:
                    ax.errorbar(row.mean, yi, xerr=row.std or 0.0, fmt="o", color=OURS_COLOR, capsize=3,
                                markersize=5, gid="ours")
                if row.published is not None:
                    ax.plot(row.published, yi, marker="D", markersize=6, markerfacecolor="none",
                            markeredgecolor=PAPER_COLOR, linestyle="none", gid="published")
                ax.text(1.02, yi, _note(row), transform=ax.get_yaxis_transform(), va="center", gid="note")
            ax.set_yticks(y, [f"{r.method} {r.bits}-bit" for r in model_rows])
            ax.set_ylim(-0.7, len(model_rows) - 0.3)
            for yi, (above, below) in zip(y[1:], zip(model_rows, model_rows[1:])):
                if above.bits != below.bits:  # a rule between bit widths
                    ax.axhline(yi + 0.5, color="0.7", linewidth=0.8)
            ax.set_title(model)
            ax.set_xlabel("top-1 (%)")
            ax.grid(axis="y", visible=False)
        handles = [plt.Line2D([], [], color=OURS_COLOR, marker="o", linestyle="none"),
                   plt.Line2D([], [], color=PAPER_COLOR, marker="D", markerfacecolor="none",
                              linestyle="none")]
        fig.legend(handles, ["ours: mean ± 1 std over seeds (final epoch)", "published"],
                   loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False)
        if title:
            fig.suptitle(textwrap.fill(title, 80))
        fig.tight_layout()
    return fig


def table_figure(rows: list[FigureRow], out_path: Path, fmt: str | None = None, title: str | None = None
                 ) -> Path:
    """Write `results_figure(rows)` to `out_path` (suffix from `fmt`, default PNG); returns the path."""
    return save_figure(results_figure(rows, title), output_path(out_path, fmt))


def write_table_figure(table: str, paper_table: Mapping[str, Any] | None, cells: Mapping[tuple, Any],
                       out_dir: Path, fmt: str = "png") -> list[Path]:
    """results/table<id>.<fmt> for make_tables: [the path], or [] when the table has no number yet."""
    rows = table_rows(table, paper_table, cells)
    if not rows:
        return []
    title = (paper_table or {}).get("title") or f"Table {table}"
    return [table_figure(rows, Path(out_dir) / f"table{table}.{fmt}", fmt, title)]
