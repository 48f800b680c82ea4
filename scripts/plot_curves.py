"""Validation top-1 and training loss per epoch of one or more runs, as one PNG.

    python scripts/plot_curves.py runs/table5_resnet18_2bit/*/* --out curves.png

Each run directory needs metrics.jsonl (its "epoch" events); config.yaml, when present, names the
run in the legend (experiment / quantizer.name / quantizer.bits / trainer.seed).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless machines
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from nulsq.cli import script_exit_code  # noqa: E402
from nulsq.log import METRICS_FILE, read_metrics  # noqa: E402

PANELS = (("val/top1", "validation top-1 (%)"), ("train/loss", "training loss"))
# config key -> how its value reads in the legend
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


def plot_runs(run_dirs: list[Path], out: Path) -> None:
    """Draw both panels, one line per run (and per stage when a run has several), into `out`."""
    fig, axes = plt.subplots(1, len(PANELS), figsize=(6 * len(PANELS), 4.5))
    for run_dir in run_dirs:
        records = read_metrics(run_dir / METRICS_FILE)
        label = run_label(run_dir)
        for ax, (key, _) in zip(axes, PANELS):
            curves = epoch_curves(records, key)
            for stage, (epochs, values) in curves.items():
                name = f"{label} ({stage})" if len(curves) > 1 and stage else label
                ax.plot(epochs, values, marker="o", markersize=3, label=name)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    return script_exit_code(lambda: plot_runs(args.run_dirs, args.out), f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
