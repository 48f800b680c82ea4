"""Run directories: their layout, their status, finding them, and loading the run one holds.

Every run writes one folder (Hydra's run directory or `trainer.output_dir`):

    config.yaml            the resolved config, written first (it marks the folder as a run)
    metrics.jsonl          one JSON event per line (nulsq/log)
    summary.json           written at the end: "status" finished | stopped | failed, top-1, ...
    checkpoints/last.pt    the last checkpoint (last.pt.prev the one before; fp.pt the FP model)
    checkpoints/eval.json  what eval.py measured for last.pt

Everything that looks for runs goes through `run_dirs`: resuming (`find_resume`), the (b+1)-bit
source of a progressive start or eval.py's argument (`resolve_checkpoint`), and make_tables
(`find_run_dirs`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from nulsq.errors import UserError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
EVAL_FILE = "eval.json"
_NO_RESUME = (None, "", "none", "null")


def last_checkpoint(run_dir: Path) -> Path:
    """Where `run_dir` keeps its last checkpoint (whether or not it exists)."""
    return Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT


def read_summary(run_dir: Path) -> dict:
    """`run_dir`'s summary.json, or {} when it has none or it cannot be read as a JSON object."""
    try:
        summary = json.loads((Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}


def status(run_dir: Path) -> str | None:
    """finished | stopped | failed from summary.json; None while running or after a kill."""
    return read_summary(run_dir).get("status")


def is_run_dir(path: Path) -> bool:
    """A folder train.py wrote: config.yaml and a summary or a checkpoint (Hydra's .hydra/ also
    holds a config.yaml, but neither of the others)."""
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (
        (path / SUMMARY_FILE).is_file() or last_checkpoint(path).is_file())


def run_dirs(roots: Iterable[Path], recursive: bool = True) -> Iterator[Path]:
    """Every run directory under `roots` (missing roots are skipped), in path order.

    Args:
        roots: folders to search.
        recursive: look at any depth (runs/, multirun/), else only the roots' direct subfolders.
    """
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        configs = root.rglob(CONFIG_FILE) if recursive else root.glob(f"*/{CONFIG_FILE}")
        for config in sorted(configs):
            if is_run_dir(config.parent):
                yield config.parent


def find_run_dirs(roots: Iterable[Path]) -> Iterator[Path]:
    """Every run directory under `roots` that has a summary.json (the runs make_tables reads)."""
    return (d for d in run_dirs(roots) if (d / SUMMARY_FILE).is_file())


def same_config(run_dir: Path, fingerprint: str | None) -> bool:
    """Whether the run in `run_dir` was made with a config of this fingerprint (None: any)."""
    if fingerprint is None:
        return True
    from nulsq.train.checkpoint import config_fingerprint  # local: checkpoint re-exports find_resume

    try:
        return config_fingerprint(OmegaConf.load(Path(run_dir) / CONFIG_FILE)) == fingerprint
    except Exception:  # noqa: BLE001  (an unreadable config.yaml is simply not this run's)
        return False


def _newest(run_dirs_: Iterable[Path]) -> Path | None:
    """The last checkpoint of the run whose checkpoint was written last."""
    checkpoints = [last_checkpoint(d) for d in run_dirs_ if last_checkpoint(d).is_file()]
    return max(checkpoints, key=lambda p: p.stat().st_mtime) if checkpoints else None


def find_resume(resume: str | None, run_dir: Path, fingerprint: str | None = None) -> Path | None:
    """The checkpoint `trainer.resume` points at: null -> none; a path -> that file (or a run
    directory's checkpoints/last.pt); auto -> this run directory's last.pt, else the newest
    unfinished sibling run (same experiment, method, bits and seed) that has one and, when
    `fingerprint` is given, the same config (a sibling stopped by a NaN loss and rerun with a
    lower lr is a different run, not one to continue)."""
    if resume in _NO_RESUME:
        return None
    if resume != "auto":
        path = Path(resume)
        return last_checkpoint(path) if path.is_dir() else path
    run_dir = Path(run_dir)
    if last_checkpoint(run_dir).is_file():
        return last_checkpoint(run_dir)
    return _newest(d for d in run_dirs([run_dir.parent], recursive=False)
                   if status(d) != "finished" and same_config(d, fingerprint))


def resolve_checkpoint(ref: str | Path, runs_root: Path | None = Path("runs"),
                       what: str | None = None) -> Path:
    """A checkpoint file, a run directory, or a run (experiment) name -> the checkpoint to read.

    A name picks the newest finished run under `runs/<name>/`.

    Args:
        ref: what the user gave.
        runs_root: where run names are looked up; None: `ref` must be a file or a run directory.
        what: how the user gave it, for the error (default "init.from_run=<ref>").
    """
    path = Path(ref)
    if path.is_file():
        return path
    if last_checkpoint(path).is_file():
        return last_checkpoint(path)
    if runs_root is not None:
        newest = _newest(d for d in run_dirs([runs_root / str(ref)]) if status(d) == "finished")
        if newest is not None:
            return newest
    expected = f"a checkpoint file or a run directory with {CHECKPOINT_DIR}/{LAST_CHECKPOINT}"
    if runs_root is not None:
        expected += f", or a run name with a finished run under {runs_root / str(ref)}"
    raise UserError(f"{what or f'init.from_run={ref}'}: no checkpoint there (expected {expected})")


def checkpoint_config(path: Path, ckpt: dict) -> DictConfig:
    """The resolved config a checkpoint was trained with: its own copy (format 2), else the
    config.yaml of the run directory it sits in."""
    if isinstance(ckpt.get("config"), str):
        if "${" in ckpt["config"]:  # nulsq stores it resolved; a resolver could read the environment
            raise UserError(f"checkpoint {path} holds a config with ${{...}} interpolations, which "
                            f"nulsq never writes; it was altered: do not use it")
        cfg = OmegaConf.create(ckpt["config"])  # OmegaConf parses YAML with a safe loader
        if isinstance(cfg, DictConfig):
            return cfg
    run_cfg = Path(path).parent.parent / CONFIG_FILE
    if Path(path).parent.name == CHECKPOINT_DIR and run_cfg.is_file():
        return OmegaConf.load(run_cfg)
    raise UserError(f"checkpoint {path} holds no config and is not inside a run directory "
                    f"(no {run_cfg}); pass the run directory it was trained in")


def build_checkpoint_model(path: Path, ckpt: dict, cfg: DictConfig) -> nn.Module:
    """The network `cfg` describes (quantized when the checkpoint is of the QAT stage), with the
    checkpoint's weights and step sizes, on the CPU, in eval mode."""
    from nulsq.train.build import build_model  # local: the trainer imports this module

    model, _ = build_model(cfg, num_classes=ckpt["num_classes"], quantized=ckpt["stage"] == "qat",
                           verbose=False, load_pretrained=False, image_size=ckpt.get("image_size"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        reason = " ".join(str(err).split())[:300]
        what = f"{cfg.model.name}, {cfg.quantizer.name} {cfg.quantizer.bits}-bit"
        raise UserError(f"checkpoint {path} does not fit the model its config describes ({what}): "
                        f"{reason}") from None
    return model.eval()


def load_run(ref: str | Path, device: str = "cpu", trust: bool = False) -> tuple[nn.Module, DictConfig]:
    """Rebuild a run's model (quantized as configured) with its last weights: (model, cfg).

    Args:
        ref: a run directory or a checkpoint file.
        device: where the model goes.
        trust: read a checkpoint of nulsq before its safe format (see nulsq/safe_load.py).
    """
    from nulsq.train.checkpoint import load_checkpoint  # local: checkpoint imports this module

    path = resolve_checkpoint(ref, what=f"run {ref}")
    ckpt = load_checkpoint(path, trust)
    cfg = checkpoint_config(path, ckpt)
    return build_checkpoint_model(path, ckpt, cfg).to(device), cfg
