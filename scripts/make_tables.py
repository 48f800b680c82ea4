"""Gather finished runs into the paper's tables: results/table<id>.md, ours beside the published.

    python scripts/make_tables.py                           # runs/ and multirun/ -> results/
    python scripts/make_tables.py --runs /scratch/runs --out /tmp/tables

All the logic is in nulsq/results.py; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nulsq.cli import report_user_errors
from nulsq.results import write_tables

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", type=Path, default=[Path("runs"), Path("multirun")],
                        help="folders searched recursively for run directories (default: runs multirun)")
    parser.add_argument("--out", type=Path, default=Path("results"),
                        help="folder for the table<id>.md files (default: results)")
    parser.add_argument("--paper", type=Path, default=ROOT / "results" / "paper.yaml",
                        help="the published numbers (default: the repository's results/paper.yaml)")
    args = parser.parse_args(argv)

    written, skipped = report_user_errors(lambda: write_tables(args.runs, args.out, args.paper))
    for path in written:
        print(f"wrote {path}")
    if skipped:
        print("skipped runs: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))


if __name__ == "__main__":
    sys.exit(main())
