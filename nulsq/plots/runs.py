"""Run directories as the figures see them: config, events, and labels that tell runs apart.

Runs that differ only in their seed are pooled into one group; any other config difference splits
groups, and the legend names the keys that tell a group from its neighbours (the --group-by keys,
then the hyperparameters that differ between groups with the same --group-by values). Two runs with
the same config and seed are not seed replicates: each is its own group, named by its folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nulsq.errors import UserError
from nulsq.log import METRICS_FILE, read_metrics

# Short names for --group-by; any other dotted config key works as well.
ALIASES = {"method": "quantizer.name", "bits": "quantizer.bits", "model": "model.name",
           "dataset": "dataset.name", "seed": "trainer.seed", "table": "table", "experiment": "experiment"}
SEED_KEY = "trainer.seed"
# Keys that say where or how fast a run computed, not what: never a reason to split groups.
IGNORED_PREFIXES = ("trainer.output_dir", "trainer.resume", "trainer.device", "trainer.compile",
                    "trainer.amp", "trainer.channels_last", "trainer.log_interval", "dataset.root",
                    "dataset.num_workers", "dataset.download", "dataset.eval_batch_size",
                    "model.cache_dir", "logger")
# A path that differs with every seed (progressive runs start from the same seed's b+1-bit run):
# only whether it is set tells runs apart.
PRESENCE_ONLY = ("init.from_run",)


def resolve_key(key: str) -> str:
    """The dotted config key of a --group-by name (an alias, or already a dotted key)."""
    return ALIASES.get(key, key)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": value} for a nested mapping; lists become tuples (hashable, comparable)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tuple(node) if isinstance(node, list) else node}


@dataclass
class Run:
    """One run directory: its resolved config (empty without config.yaml) and its events."""

    path: Path
    cfg: dict[str, Any]
    records: list[dict[str, Any]] = field(repr=False)

    @property
    def settings(self) -> dict[str, Any]:
        """The flattened config minus the keys that never tell runs apart (IGNORED_PREFIXES)."""
        flat = flatten(self.cfg)
        for key in PRESENCE_ONLY:
            if key in flat:
                flat[key] = "set" if flat[key] else None
        return {k: v for k, v in flat.items()
                if not any(k == p or k.startswith(p + ".") for p in IGNORED_PREFIXES)}

    def get(self, dotted: str) -> Any:
        return flatten(self.cfg).get(dotted)


def load_run(path: Path) -> Run:
    """Read a run directory (metrics.jsonl required, config.yaml optional)."""
    path = Path(path)
    records = read_metrics(path / METRICS_FILE)
    cfg: dict[str, Any] = {}
    if (path / "config.yaml").is_file():
        try:
            cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path / 'config.yaml'} is not valid YAML ({err}); fix or delete it") from None
    return Run(path, cfg, records)


def value_text(key: str, value: Any, method_labels: dict[str, str] | None = None) -> str:
    """How a config value reads in a legend ("nuLSQ-A", "2-bit", "seed 0", "lr=0.01" is the caller's)."""
    if key == "quantizer.name":
        return (method_labels or {}).get(str(value), str(value))
    if key == "quantizer.bits":
        return f"{value}-bit"
    if key == SEED_KEY:
        return f"seed {value}"
    return str(value)


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key by its shortest suffix that no other key of `keys` ends with."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and (other == suffix or other.endswith("." + suffix)) for other in keys):
                break
        out[key] = suffix
    return out


def distinct_suffixes(paths: list[Path]) -> list[str]:
    """The fewest trailing folder names that tell each path from the others."""
    for n in range(1, max(len(p.parts) for p in paths) + 1):
        tails = ["/".join(p.parts[-n:]) for p in paths]
        if len(set(tails)) == len(tails):
            return tails
    return [str(p) for p in paths]


@dataclass
class Group:
    """Runs pooled as one legend entry: they differ at most in their seed."""

    runs: list[Run]
    label: str
    base: tuple  # the --group-by values


def group_runs(runs: list[Run], group_by: list[str], method_labels: dict[str, str] | None = None
               ) -> list[Group]:
    """Pool `runs` by the --group-by keys and every other differing setting except the seed.

    Args:
        runs: the runs, in the order given (groups keep the order of their first run).
        group_by: --group-by names (aliases or dotted keys).
        method_labels: quantizer.name -> how the paper writes it ("nulsq_a" -> "nuLSQ-A").

    Returns:
        The groups, each labelled by what tells it apart from the others.
    """
    keys = [resolve_key(k) for k in group_by]
    with_cfg = [r for r in runs if r.cfg]
    settings = {id(r): r.settings for r in with_cfg}
    known = {k for r in with_cfg for k in flatten(r.cfg)}
    for name, key in zip(group_by, keys):
        if with_cfg and key not in known:
            raise UserError(f"unknown --group-by key '{name}': no run's config.yaml has '{key}'; use "
                            f"{', '.join(ALIASES)} or a dotted config key")
    all_keys = sorted({k for s in settings.values() for k in s} - set(keys) - {SEED_KEY})
    differing = [k for k in all_keys if len({settings[id(r)].get(k) for r in with_cfg}) > 1]

    buckets: dict[tuple, list[Run]] = {}
    for run in with_cfg:
        s = settings[id(run)]
        full = tuple(s.get(k) for k in keys) + tuple(s.get(k) for k in differing)
        buckets.setdefault(full, []).append(run)
    # Keys that tell apart groups with equal --group-by values: they go into the labels.
    by_base: dict[tuple, list[tuple]] = {}
    for full in buckets:
        by_base.setdefault(full[: len(keys)], []).append(full)
    shown = {base: [k for i, k in enumerate(differing) if len({f[len(keys) + i] for f in fulls}) > 1]
             for base, fulls in by_base.items()}
    names = short_names(differing)

    groups: list[Group] = []
    for full, members in buckets.items():
        base = full[: len(keys)]
        parts = [value_text(k, v, method_labels) for k, v in zip(keys, base) if v is not None]
        parts += [f"{names[k]}={full[len(keys) + differing.index(k)]}" for k in shown[base]]
        label = " ".join(parts) or "runs"
        seeds = [r.get(SEED_KEY) for r in members]
        if len(set(seeds)) == len(seeds):
            groups.append(Group(members, label, base))
        else:  # the same config and seed twice: reruns, not replicates; keep each apart
            for run, tail in zip(members, distinct_suffixes([r.path for r in members])):
                groups.append(Group([run], f"{label} seed {run.get(SEED_KEY)} ({tail})", base))
    groups += [Group([r], r.path.name, ()) for r in runs if not r.cfg]
    # Different settings may still print alike (e.g. a key missing vs null): add the folders.
    texts = [g.label for g in groups]
    clashing = [g for g in groups if texts.count(g.label) > 1]
    if clashing:
        paths = [r.path for g in clashing for r in g.runs]
        tails = dict(zip(paths, distinct_suffixes(paths)))
        for g in clashing:
            g.label = f"{g.label} ({', '.join(tails[r.path] for r in g.runs)})"
    order = {id(r): i for i, r in enumerate(runs)}
    return sorted(groups, key=lambda g: min(order[id(r)] for r in g.runs))
