"""Run directories -> the paper's tables in markdown, our numbers beside the published ones.

A run counts when its folder holds `summary.json` with status "finished" and the resolved
`config.yaml` names a `table`. Runs are grouped by (table, model, row, bits), where the row is the
method (`quantizer.name`), or for the tables whose rows are training recipes (main Table 1,
supplement Table C) the recipe (see ROW_KEYS), tagged " [bf16, ...]" when the run's summary
records a protocol off the authors' (nulsq.protocol.protocol_tag), so protocols never average
together; a tagged row is still compared with its method's published number. Per group: the
mean ± std (sample std, ddof 1) of the final top-1 over seeds, the best run's final top-1, the
published number from results/paper.yaml, and the difference (our mean - published). The final
top-1, not each run's best epoch: choosing the best epoch on the evaluation set is selecting on
the test set (the authors' code does; see docs/fidelity.md).

Skipped: unfinished runs, runs without a table (the demo), and search runs (`dataset.val_split`
> 0), which score a held-out part of the training set, not the paper's evaluation set. Two runs of
one group with the same seed count once: the newer one.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from nulsq.errors import UserError
from nulsq.protocol import protocol_tag
from nulsq.registry import Registry
from nulsq.rundir import find_run_dirs

GroupKey = tuple[str, str, str, int]  # (table, model, row, bits)
RowKey = Callable[[dict], str]
ROW_KEYS: Registry[RowKey] = Registry("table row key")


def _get(cfg: dict, dotted: str, default: Any = None) -> Any:
    """cfg["a"]["b"] for "a.b", or `default` when any part is missing."""
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _recipe(cfg: dict) -> str:
    """"progressive" for a run initialised from a (b+1)-bit run, else "<step optimizer>+<init>"."""
    if _get(cfg, "init.from_run"):
        return "progressive"
    return f"{_get(cfg, 'optim.quant.name')}+{_get(cfg, 'init.method')}"


# Tables whose rows are training recipes of one method rather than methods.
ROW_KEYS.register("1")(_recipe)
ROW_KEYS.register("C")(_recipe)


def row_key(table: str, cfg: dict) -> str:
    """The row a run belongs to in `table`: the recipe for ROW_KEYS tables, else the method."""
    if table in ROW_KEYS:
        return ROW_KEYS.get(table)(cfg)
    return str(_get(cfg, "quantizer.name"))


@dataclass(frozen=True)
class RunRecord:
    """One finished table run, reduced to what the tables need."""

    table: str
    model: str
    row: str
    bits: int
    seed: int
    top1: float
    fp_top1: float | None
    path: Path
    mtime: float

    @property
    def group(self) -> GroupKey:
        return (self.table, self.model, self.row, self.bits)


@dataclass(frozen=True)
class Cell:
    """Our result for one group: n runs, mean and sample std of top-1, the best run's top-1."""

    n: int
    mean: float
    std: float | None  # None for a single run
    best: float


def load_run(run_dir: Path) -> tuple[RunRecord | None, str]:
    """(record, "") for a run that counts, else (None, why it was skipped).

    Args:
        run_dir: a folder with summary.json and the resolved config.yaml.
    """
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None, "unreadable"
    if summary.get("status") != "finished":
        return None, f"status {summary.get('status')}"
    table = cfg.get("table")
    if table is None:
        return None, "no table"
    if float(_get(cfg, "dataset.val_split", 0.0) or 0.0) > 0:
        return None, "search run (val_split > 0)"
    if summary.get("top1") is None:
        return None, "no top1"
    record = RunRecord(
        table=str(table),
        model=str(_get(cfg, "model.name")),
        # A run off the authors' protocol (bf16, fp_eval init, ...) gets a row of its own.
        row=row_key(str(table), cfg) + protocol_tag(summary.get("protocol")),
        bits=int(_get(cfg, "quantizer.bits")),
        seed=int(_get(cfg, "trainer.seed", 0)),
        top1=float(summary["top1"]),
        fp_top1=summary.get("fp_top1"),
        path=run_dir,
        mtime=(run_dir / "summary.json").stat().st_mtime,
    )
    return record, ""


def load_runs(roots: Iterable[Path]) -> tuple[list[RunRecord], Counter]:
    """The runs that count under `roots` (one per group and seed, the newest), and skip reasons."""
    newest: dict[tuple[GroupKey, int], RunRecord] = {}
    skipped: Counter = Counter()
    for run_dir in find_run_dirs(roots):
        record, why = load_run(run_dir)
        if record is None:
            skipped[why] += 1
            continue
        key = (record.group, record.seed)
        if key in newest:
            skipped["same seed, older run"] += 1
            if newest[key].mtime >= record.mtime:
                continue
        newest[key] = record
    return sorted(newest.values(), key=lambda r: (r.group, r.seed)), skipped


def aggregate(records: Iterable[RunRecord]) -> dict[GroupKey, Cell]:
    """Mean, sample std, n and best of final top-1 per (table, model, row, bits)."""
    values: dict[GroupKey, list[float]] = {}
    for r in records:
        values.setdefault(r.group, []).append(r.top1)
    return {
        key: Cell(
            n=len(v),
            mean=statistics.fmean(v),
            std=statistics.stdev(v) if len(v) > 1 else None,
            best=max(v),
        )
        for key, v in values.items()
    }


def load_paper(path: Path) -> dict[str, dict]:
    """results/paper.yaml as {table id: table}; a missing file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"published numbers file not found: {path}; pass --paper results/paper.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    return {str(k): v for k, v in (data.get("tables") or {}).items()}


# ------------------------------------------------------------------------------- rendering
def _num(x: float) -> str:
    """A published number as printed: one decimal (66.0, 95.0) unless it has two (90.96)."""
    return f"{x:.1f}" if round(x, 1) == x else f"{x:.2f}"


def format_ours(cell: Cell | None) -> str:
    if cell is None:
        return "not run"
    if cell.std is None:
        return f"{cell.mean:.2f} (n=1)"
    return f"{cell.mean:.2f} ± {cell.std:.2f} (n={cell.n})"


def published_mean(published: Any) -> float | None:
    """The number ours is compared with: a bare number, or the mean of a {mean, std, best} cell."""
    if isinstance(published, (int, float)):
        return float(published)
    if isinstance(published, dict) and published.get("mean") is not None:
        return float(published["mean"])
    return None


def format_published(published: Any) -> str:
    if published is None:
        return ""
    if isinstance(published, (int, float)):
        return _num(published)
    parts = []
    if published.get("mean") is not None:
        # means and stds are published with two decimals (supplement Table A)
        mean = f"{published['mean']:.2f}"
        std = published.get("std")
        parts.append(f"{mean} ± {std:.2f}" if std is not None else mean)
    if published.get("best") is not None:
        parts.append(f"best {_num(published['best'])}")
    return ", ".join(parts)


def format_diff(cell: Cell | None, published: Any) -> str:
    ref = published_mean(published)
    if cell is None or ref is None:
        return ""
    # round first, and + 0.0 turns a rounded -0.0 into 0.0, so no "-0.00" appears
    return f"{round(cell.mean - ref, 2) + 0.0:+.2f}"


def _ordered(first: Iterable[str], seen: Iterable[str]) -> list[str]:
    """`first` in its order, then the others of `seen` sorted."""
    first = list(dict.fromkeys(first))
    return first + sorted(set(seen) - set(first))


def _fp_line(model: str, paper: dict, records: list[RunRecord]) -> str:
    published = (paper.get("fp") or {}).get(model)
    ours = [r.fp_top1 for r in records if r.model == model and r.fp_top1 is not None]
    parts = [f"published {_num(published)}" if published is not None else "not published"]
    if ours:
        parts.append(f"ours {statistics.fmean(ours):.2f} (mean of {len(ours)} runs' FP evaluation)")
    return "FP top-1: " + "; ".join(parts)


def render_table(table: str, paper: dict | None, cells: dict[GroupKey, Cell],
                 records: list[RunRecord]) -> str:
    """The markdown of one table: a section per model, rows = methods, 4 columns per bit width.

    Args:
        table: the table id (the configs' `table` value).
        paper: its entry of results/paper.yaml, or None when the paper file does not list it.
        cells: our aggregated results (every table; only this table's are used).
        records: the runs behind `cells` (for the FP line).
    """
    paper = paper or {}
    rows = paper.get("rows") or {}
    labels = paper.get("labels") or {}
    ours = {k: c for k, c in cells.items() if k[0] == table}
    mine = [r for r in records if r.table == table]
    bits = sorted(set(paper.get("bits") or []) | {k[3] for k in ours})
    models = _ordered(rows, (k[1] for k in ours))

    lines = [f"# {paper.get('title', f'Table {table} (not in results/paper.yaml)')}", ""]
    if paper.get("source"):
        lines += [f"Source: {paper['source']}.", ""]
    lines += [
        "Top-1 %. ours: mean ± std of the final top-1 over seeds (n runs); best: the best run; "
        "paper: the published number; Δ: ours - paper. A row tagged [...] ran off the authors' "
        "protocol (bf16, another init protocol, ...; docs/fidelity.md). Generated by "
        "scripts/make_tables.py.", "",
    ]
    for model in models:
        model_rows = rows.get(model) or {}
        names = _ordered(model_rows, (k[2] for k in ours if k[1] == model))
        lines += [f"## {model}", "", _fp_line(model, paper, mine), ""]
        header = ["method"] + [f"{b}-bit {col}" for b in bits for col in ("ours", "best", "paper", "Δ")]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            base, tag = name.split(" [", 1) if " [" in name else (name, "")
            cells_row = [labels.get(base, base) + (f" [{tag}" if tag else "")]
            for b in bits:
                cell = ours.get((table, model, name, b))
                published = (model_rows.get(base) or {}).get(b)
                cells_row += [format_ours(cell), f"{cell.best:.2f}" if cell else "",
                              format_published(published), format_diff(cell, published)]
            lines.append("| " + " | ".join(cells_row) + " |")
        lines.append("")
    return "\n".join(lines)


def table_filename(table: str) -> str:
    return f"table{table}.md"


def write_tables(run_roots: Iterable[Path], out_dir: Path, paper_path: Path) -> tuple[list[Path], Counter]:
    """Write results/table<id>.md for every table in the paper file or in the runs.

    Args:
        run_roots: folders searched (recursively) for run directories.
        out_dir: where the markdown files go (created if missing).
        paper_path: results/paper.yaml.

    Returns:
        (the files written, the count of skipped runs by reason).
    """
    paper = load_paper(paper_path)
    records, skipped = load_runs(run_roots)
    cells = aggregate(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for table in _ordered(paper, (k[0] for k in cells)):
        path = out_dir / table_filename(table)
        path.write_text(render_table(table, paper.get(table), cells, records))
        written.append(path)
    return written, skipped
