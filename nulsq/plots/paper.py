"""The published numbers of results/paper.yaml, as the figures use them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nulsq.results import load_paper, published_mean, row_key

DEFAULT_PAPER = Path(__file__).resolve().parents[2] / "results" / "paper.yaml"


def load_paper_or_none(path: Path | None, explicit: bool) -> dict[str, dict] | None:
    """The paper tables; None when no path is given, or when the default file is absent (an
    installed package has no results/); a path the user gave must exist (UserError otherwise)."""
    if path is None or (not explicit and not Path(path).is_file()):
        return None
    return load_paper(path)


def method_labels(paper: dict[str, dict] | None) -> dict[str, str]:
    """quantizer.name -> the paper's name for it ("nulsq_a" -> "nuLSQ-A"), over every table."""
    labels: dict[str, str] = {}
    for table in (paper or {}).values():
        for key, text in (table.get("labels") or {}).items():
            labels.setdefault(str(key), str(text))
    return labels


def table_cell(cfg: dict[str, Any]) -> tuple[str, str, str, int] | None:
    """(table, model, row, bits) of a run's resolved config; None for runs outside the tables and
    for search runs (dataset.val_split > 0 scores held-out training data, not the paper's set)."""
    table = cfg.get("table")
    model = (cfg.get("model") or {}).get("name")
    bits = (cfg.get("quantizer") or {}).get("bits")
    if table is None or model is None or bits is None:
        return None
    if float((cfg.get("dataset") or {}).get("val_split") or 0.0) > 0:
        return None
    return str(table), str(model), row_key(str(table), cfg), int(bits)


def published_top1(paper: dict[str, dict] | None, cell: tuple[str, str, str, int] | None) -> float | None:
    """The published top-1 (%) of a table cell, or None (no paper, no such cell, or null)."""
    if paper is None or cell is None:
        return None
    table, model, row, bits = cell
    rows = ((paper.get(table) or {}).get("rows") or {}).get(model) or {}
    return published_mean((rows.get(row) or {}).get(bits))
