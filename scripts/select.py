"""Select the best setting of a hyperparameter sweep and write the final runs' hparams file.

    python scripts/select.py multirun/table5_resnet18_2bit/2026-01-01_12-00-00
    python scripts/select.py <sweep dir> --seeds 0 1 2 3 4 --hparams-dir configs/hparams

Writes <sweep dir>/selection.md (every setting ranked by mean held-out top-1 over seeds) and, per
(experiment, method), configs/hparams/selected/<experiment>_<method>.yaml, then prints the command
that trains the winner with the final seeds. All the logic is in nulsq/selection.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the standard library's `select`, which subprocess imports: keep its
# folder off the import path so that import finds the real module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402

from nulsq import selection  # noqa: E402
from nulsq.cli import report_user_errors  # noqa: E402
from nulsq.train.checkpoint import atomic_write_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_selection(sweep_dir: Path, hparams_dir: Path, seeds: list[int], out: Path | None) -> list[str]:
    """Rank, write the table and one hparams file per winner; returns the lines to print."""
    runs, skipped = selection.load_search_runs(sweep_dir)
    selections = selection.select(runs)
    table = out or sweep_dir / "selection.md"
    atomic_write_text(table, selection.render(selections, sweep_dir, skipped))
    printed = [f"wrote {table}"]
    for sel in selections:
        winner = sel.winner
        if winner is None:
            printed.append(f"{sel.name}: no eligible setting (see {table})")
            continue
        path = hparams_dir / f"{sel.name}.yaml"
        atomic_write_text(path, selection.hparams_yaml(sel, seeds, sweep_dir))
        chosen = " ".join(selection.winning_overrides(sel)) or "(the only setting)"
        printed += [f"{sel.name}: {chosen}: held-out top-1 {winner.mean:.2f} over "
                    f"{len(winner.scores)} seeds; wrote {path}",
                    "  final runs: python train.py "
                    + " ".join(selection.base_overrides(sel) + [f"hparams={sel.name}"])]
    if skipped:
        printed.append("skipped runs: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    return printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="the sweep's folder (searched recursively for runs)")
    parser.add_argument("--hparams-dir", type=Path, default=ROOT / "configs" / "hparams",
                        help="the hparams folder: writes selected/<experiment>_<method>.yaml there "
                             "(default: configs/hparams)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4],
                        help="trainer.seed values of the final runs (default: 0 1 2 3 4)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the ranking table (default: <sweep>/selection.md)")
    args = parser.parse_args(argv)
    printed = report_user_errors(lambda: write_selection(args.sweep, args.hparams_dir, args.seeds, args.out))
    print("\n".join(printed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
