"""Pick the best setting of a hyperparameter sweep, as the paper's protocol does (supplement C-I/C-II):
each setting's score is its held-out top-1 at the last epoch, averaged over seeds; the best mean
wins, and the final runs train that setting on the full training set with several seeds.

A sweep's runs are grouped by (experiment, model, method, bits), one selection each, and within a
group by setting (`nulsq.results.experiment_setting`: the config minus seed and paths). The keys
whose values differ between a group's settings are what the sweep searched; the winner's values of
those keys become `configs/hparams/selected/<experiment>_<method>.yaml`, an hparams file that runs
the final seeds by itself, and a command line with the same values.

Only runs scored on a held-out part of the training set (`dataset.val_split` > 0) are used: runs
scored on the evaluation set are skipped, and a sweep with none of the former is refused, since
choosing hyperparameters on the evaluation set inflates the reported number. A setting with a failed
run (a diverging seed) is listed but not eligible.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nulsq.cli import report_user_errors
from nulsq.errors import UserError
from nulsq.results import config_value as _get
from nulsq.results import experiment_setting, find_run_dirs, setting_id
from nulsq.train.checkpoint import atomic_write_text

# The search protocol (the hparams grids set these): dropped from the final runs' command line,
# which trains the experiment's own length on the full training set.
SEARCH_PROTOCOL_KEYS = ("dataset.val_split", "trainer.epochs", "schedule.warmup_epochs")
# Overrides that never carry over from a search job to the final runs.
_NOT_CARRIED = ("trainer.seed", "trainer.output_dir", "trainer.resume", "hparams", "hydra.")
GroupKey = tuple[str, str, str, int]  # (experiment, model, method, bits)


@dataclass
class SearchRun:
    """One run of a sweep: its folder, score and the command-line overrides Hydra recorded."""

    path: Path
    group: GroupKey
    setting: str
    flat: dict[str, Any]  # experiment_setting, flattened to dotted keys
    seed: int
    status: str
    top1: float | None
    overrides: list[str] | None  # .hydra/overrides.yaml, None outside a Hydra multirun


@dataclass
class Setting:
    """The runs of one setting and their mean held-out top-1 (finished runs only)."""

    id: str
    runs: list[SearchRun]
    values: dict[str, Any] = field(default_factory=dict)  # the searched keys' values

    @property
    def scores(self) -> list[float]:
        return [r.top1 for r in self.runs if r.status == "finished" and r.top1 is not None]

    @property
    def failed(self) -> int:
        return sum(r.status == "failed" for r in self.runs)

    @property
    def eligible(self) -> bool:
        return self.failed == 0 and bool(self.scores)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.scores) if self.scores else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else None


@dataclass
class Selection:
    """One group's ranked settings (best first; ineligible ones last) and the searched keys."""

    group: GroupKey
    ranked: list[Setting]
    searched: list[str]

    @property
    def winner(self) -> Setting | None:
        return self.ranked[0] if self.ranked and self.ranked[0].eligible else None

    @property
    def name(self) -> str:
        experiment, _, method, _ = self.group
        # the hparams option (hparams=selected/...): a subfolder, apart from the paper's grids
        return f"selected/{experiment}_{method}"


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_run(run_dir: Path) -> tuple[dict, dict, list[str] | None] | None:
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else None
    return cfg, summary, overrides


def load_search_runs(sweep_dir: Path) -> tuple[list[SearchRun], Counter]:
    """The sweep's runs scored on a held-out split, and the count of runs skipped by reason.

    Raises:
        UserError: the folder holds no runs, or none scored on a held-out split.
    """
    runs, skipped, evaluation_set = [], Counter(), 0
    for run_dir in find_run_dirs([sweep_dir]):
        read = _read_run(run_dir)
        if read is None:
            skipped["unreadable"] += 1
            continue
        cfg, summary, overrides = read
        if float(_get(cfg, "dataset.val_split", 0.0) or 0.0) <= 0:
            evaluation_set += 1
            skipped["scored on the evaluation set (dataset.val_split = 0)"] += 1
            continue
        status = str(summary.get("status"))
        if status not in ("finished", "failed"):
            skipped[f"status {status}"] += 1
            continue
        group = (str(cfg.get("experiment")), str(_get(cfg, "model.name")),
                 str(_get(cfg, "quantizer.name")), int(_get(cfg, "quantizer.bits", 0)))
        setting = experiment_setting(cfg, summary)
        runs.append(SearchRun(run_dir, group, setting_id(setting), _flatten(setting),
                              int(_get(cfg, "trainer.seed", 0)), status, summary.get("top1"), overrides))
    if not runs:
        if evaluation_set:
            raise UserError(
                f"refusing to select on the evaluation set: the {evaluation_set} runs under {sweep_dir} "
                f"have dataset.val_split=0; run the search with an hparams grid (it scores a held-out "
                f"10% of the training set, dataset.val_split=0.1)")
        raise UserError(f"no run directories (summary.json + config.yaml) under {sweep_dir}; pass "
                        f"the folder of a sweep, e.g. multirun/<experiment>/<time>")
    return runs, skipped


def select(runs: list[SearchRun]) -> list[Selection]:
    """Rank each group's settings by mean held-out top-1 (eligible settings first)."""
    groups: dict[GroupKey, dict[str, list[SearchRun]]] = {}
    for run in runs:
        groups.setdefault(run.group, {}).setdefault(run.setting, []).append(run)
    selections = []
    for group, by_setting in sorted(groups.items()):
        flats = [r[0].flat for r in by_setting.values()]
        keys = sorted(set().union(*flats))
        searched = [k for k in keys if len({json.dumps(f.get(k), sort_keys=True) for f in flats}) > 1]
        settings = [Setting(sid, sorted(rs, key=lambda r: r.seed),
                            {k: rs[0].flat.get(k) for k in searched}) for sid, rs in by_setting.items()]
        settings.sort(key=lambda s: (not s.eligible, -(s.mean if s.mean is not None else -1.0), s.id))
        selections.append(Selection(group, settings, searched))
    return selections


# ------------------------------------------------------------------------------- outputs
def override_value(value: Any) -> str:
    """A value as Hydra's command line and sweeper params read it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    text = str(value)
    return text if text.replace("_", "").replace("-", "").replace(".", "").isalnum() else f"'{text}'"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def base_overrides(selection: Selection) -> list[str]:
    """What the user typed for the search (recorded by Hydra), minus the seed, the search protocol,
    the hparams file and the searched keys: the final runs' command line starts with these."""
    winner = selection.winner or selection.ranked[0]
    recorded = next((r.overrides for r in winner.runs if r.overrides is not None), None)
    if recorded is None:  # not a Hydra multirun: the experiment is all we know
        experiment = selection.group[0]
        return [] if experiment == "default" else [f"+experiment={experiment}"]
    dropped = set(SEARCH_PROTOCOL_KEYS) | set(selection.searched)
    return [o for o in recorded
            if _key(o) not in dropped and not _key(o).startswith(_NOT_CARRIED)]


def chosen_values(selection: Selection) -> dict[str, Any]:
    """The winner's values of the searched keys, without the search protocol's (a sweep over
    trainer.epochs compares short runs; the final runs train the experiment's own length)."""
    winner = selection.winner
    if winner is None:
        return {}
    return {k: v for k, v in winner.values.items() if k not in SEARCH_PROTOCOL_KEYS}


def winning_overrides(selection: Selection) -> list[str]:
    """`key=value` for each searched key, at the winner's value."""
    return [f"{k}={override_value(v)}" for k, v in chosen_values(selection).items()]


def hparams_yaml(selection: Selection, seeds: list[int], source: Path) -> str:
    """An hparams file (configs/hparams/selected/<experiment>_<method>.yaml) that runs the final
    seeds of the winner."""
    winner = selection.winner
    assert winner is not None
    experiment, model, method, bits = selection.group
    params = {k: override_value(v) for k, v in chosen_values(selection).items()}
    params["trainer.seed"] = ",".join(str(s) for s in seeds)
    lines = [
        "# @package _global_",
        f"# Written by scripts/select.py from the sweep {source}: {experiment}, {model}, {method} "
        f"{bits}-bit.",
        f"# Winner: setting {winner.id}, held-out top-1 {winner.mean:.2f} (mean of {len(winner.scores)} "
        "seeds). The final runs (full training set, the experiment's epochs):",
        f"#   python train.py {' '.join(base_overrides(selection) + [f'hparams={selection.name}'])}",
        "hydra:",
        "  mode: MULTIRUN   # the final seeds are a sweep: no -m needed",
        "  sweeper:",
        "    params:",
        *(f"      {k}: {v}" for k, v in params.items()),
    ]
    return "\n".join(lines) + "\n"


def _fmt(setting: Setting) -> str:
    if setting.mean is None:
        return "-"
    std = f" ± {setting.std:.2f}" if setting.std is not None else ""
    return f"{setting.mean:.2f}{std}"


def render(selections: list[Selection], sweep_dir: Path, skipped: Counter) -> str:
    """The selection as markdown: per group, every setting ranked, the winner first."""
    lines = [f"# Selection from {sweep_dir}", "",
             "Score: held-out top-1 % at the last epoch (dataset.val_split > 0), mean ± sample std "
             "over seeds. A setting with a failed run is not eligible. Written by scripts/select.py.", ""]
    if skipped:
        lines += ["Skipped runs: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())), ""]
    for sel in selections:
        experiment, model, method, bits = sel.group
        lines += [f"## {experiment}: {model}, {method} {bits}-bit", ""]
        header = ["rank", *(sel.searched or ["setting"]), "top-1", "n", "seeds", "failed", "setting"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for rank, s in enumerate(sel.ranked, start=1):
            values = [override_value(s.values[k]) for k in sel.searched] or ["(only one)"]
            seeds = ",".join(str(r.seed) for r in s.runs)
            lines.append("| " + " | ".join([str(rank) if s.eligible else "-", *values, _fmt(s),
                                            str(len(s.scores)), seeds, str(s.failed), s.id]) + " |")
        lines.append("")
        if sel.winner is None:
            lines += ["No eligible setting (every setting has a failed or unfinished run).", ""]
        else:
            final = base_overrides(sel) + winning_overrides(sel) + ["hparams=seeds"]
            lines += ["Final runs:", "", "```",
                      f"python train.py {' '.join(base_overrides(sel) + [f'hparams={sel.name}'])}",
                      f"python train.py {' '.join(final)}   # the same, spelled out", "```", ""]
    return "\n".join(lines)


# -- the command line (scripts/select.py) ------------------------------------------------------------

HPARAMS_DIR = Path(__file__).resolve().parents[1] / "configs" / "hparams"


def write_selection(sweep_dir: Path, hparams_dir: Path, seeds: list[int], out: Path | None) -> list[str]:
    """Rank, write the table and one hparams file per winner; returns the lines to print."""
    runs, skipped = load_search_runs(sweep_dir)
    selections = select(runs)
    table = out or sweep_dir / "selection.md"
    atomic_write_text(table, render(selections, sweep_dir, skipped))
    printed = [f"wrote {table}"]
    for sel in selections:
        winner = sel.winner
        if winner is None:
            printed.append(f"{sel.name}: no eligible setting (see {table})")
            continue
        path = hparams_dir / f"{sel.name}.yaml"
        atomic_write_text(path, hparams_yaml(sel, seeds, sweep_dir))
        chosen = " ".join(winning_overrides(sel)) or "(the only setting)"
        printed += [f"{sel.name}: {chosen}: held-out top-1 {winner.mean:.2f} over "
                    f"{len(winner.scores)} seeds; wrote {path}",
                    "  final runs: python train.py "
                    + " ".join(base_overrides(sel) + [f"hparams={sel.name}"])]
    if skipped:
        printed.append("skipped runs: " + ", ".join(f"{n} {why}" for why, n in sorted(skipped.items())))
    return printed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Select the best setting of a hyperparameter sweep")
    parser.add_argument("sweep", type=Path, help="the sweep's folder (searched recursively for runs)")
    parser.add_argument("--hparams-dir", type=Path, default=HPARAMS_DIR,
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
