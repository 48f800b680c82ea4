"""Validation top-1 and training loss per QAT epoch, mean and band over seeds, against the paper.

    python scripts/plot_curves.py runs/table5_resnet18_2bit/*/* --out curves.png
    python scripts/plot_curves.py runs/cifar10_*/*/* --group-by method,bits,model --band minmax --fp

Runs that differ only in their seed are pooled (mean line, ± std or min-max band); the legend says
what differs between groups (--group-by keys, then any other differing setting). Where a group is
one cell of a paper table, the published top-1 from results/paper.yaml is a dashed line.
The drawing lives in nulsq/plots/curves.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nulsq.cli import script_exit_code
from nulsq.plots.curves import BANDS, epoch_curves, plot_curves, run_label  # noqa: F401 (re-exported)
from nulsq.plots.paper import DEFAULT_PAPER
from nulsq.plots.style import add_format_argument, output_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the figure to write")
    add_format_argument(parser)
    parser.add_argument("--group-by", default="method,bits",
                        help="comma-separated names (method, bits, model, dataset, table, experiment, "
                             "seed) or dotted config keys; runs differing only in seed are pooled")
    parser.add_argument("--band", choices=sorted(BANDS), default="std", help="band over seeds")
    parser.add_argument("--fp", action="store_true", help="also draw the FP pretraining stage")
    parser.add_argument("--paper", type=Path, default=None,
                        help=f"published numbers (default: {DEFAULT_PAPER.name} of this repository)")
    parser.add_argument("--no-paper", action="store_true", help="no published-number lines")
    args = parser.parse_args(argv)
    paper = None if args.no_paper else (args.paper or DEFAULT_PAPER)
    group_by = [k.strip() for k in args.group_by.split(",") if k.strip()]
    return script_exit_code(
        lambda: plot_curves(args.run_dirs, args.out, group_by, args.band, args.fp, paper,
                            paper_explicit=args.paper is not None, fmt=args.format),
        f"wrote {output_path(args.out, args.format)}")


if __name__ == "__main__":
    sys.exit(main())
