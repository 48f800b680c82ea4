"""Progressive fine-tuning, model level: a b-bit model's starting point from a trained (b+1)-bit run.

Network weights (and BN statistics) are copied as they are; each quantizer merges its own
parameters from the same layer's (b+1)-bit ones (`Quantizer.merge_from`, which for nuLSQ pairs
adjacent steps: supplement D-III).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.convert import quantizers


def resolve_run_checkpoint(ref: str | Path, runs_root: Path = Path("runs")) -> Path:
    """A checkpoint file, a run directory, or a run (experiment) name -> the checkpoint to read.

    A name picks the newest finished run under `runs/<name>/`.
    """
    path = Path(ref)
    if path.is_file():
        return path
    if (path / "checkpoints" / "last.pt").is_file():
        return path / "checkpoints" / "last.pt"
    finished = []
    for summary in (runs_root / str(ref)).glob("**/summary.json"):
        if json.loads(summary.read_text()).get("status") == "finished":
            ckpt = summary.parent / "checkpoints" / "last.pt"
            if ckpt.is_file():
                finished.append(ckpt)
    if finished:
        return max(finished, key=lambda p: p.stat().st_mtime)
    raise UserError(
        f"init.from_run={ref}: no checkpoint there (expected a checkpoint file, a run directory with "
        f"checkpoints/last.pt, or a run name with a finished run under {runs_root / str(ref)})"
    )


@torch.no_grad()
def load_progressive(model: nn.Module, ref: str | Path) -> Path:
    """Initialise the quantized `model` from the (b+1)-bit run `ref`; returns the checkpoint used."""
    path = resolve_run_checkpoint(ref)
    try:
        old = torch.load(path, map_location="cpu", weights_only=False)["model"]
    except Exception as err:  # noqa: BLE001  (unreadable file of any kind)
        raise UserError(f"init.from_run: cannot read {path} ({type(err).__name__})") from None
    qmods = quantizers(model)
    owned = {f"{name}.{p}" for name, q in qmods.items() for p, _ in q.named_parameters(recurse=False)}
    plain = {k: v for k, v in model.state_dict().items() if k not in owned}
    missing = [k for k in plain if k not in old and not _is_quantizer_buffer(k, qmods)]
    if missing:
        raise UserError(
            f"init.from_run: {path} does not match this model (missing {missing[:3]}); "
            f"it must be a run of the same model at one more bit"
        )
    model.load_state_dict({k: old[k] for k in plain if k in old}, strict=False)
    for name, q in qmods.items():
        mine = dict(q.named_parameters(recurse=False))
        if not mine:
            continue
        theirs = {p: old[f"{name}.{p}"] for p in mine if f"{name}.{p}" in old}
        if len(theirs) != len(mine):
            raise UserError(f"init.from_run: {path} has no quantizer parameters for layer '{name}'")
        q.merge_from({k: v.to(mine[k].device) for k, v in theirs.items()})
    return path


def _is_quantizer_buffer(key: str, qmods: dict) -> bool:
    return any(key.startswith(f"{name}.") for name in qmods)
