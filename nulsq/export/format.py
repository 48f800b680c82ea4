"""The export folder: file names, tensor keys, and reading it back with every corruption refused.

    DIR/manifest.json         the manifest (written last: it exists only once the tensors do)
    DIR/tensors.safetensors   every tensor (codes, level tables, thresholds, float parameters)
    DIR/model.onnx            optional (`--onnx`): the fake-quantized model for onnxruntime

Tensor keys: `state.<name>` for a tensor kept in float (its model state_dict name), and per
quantized layer `<layer>.weight.codes` (packed uint8), `<layer>.weight.levels`,
`<layer>.act.levels`, `<layer>.act.thresholds` (float32). docs/export.md describes the manifest.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from nulsq.errors import UserError

FORMAT = "nulsq-export"
VERSION = 1
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
ONNX = "model.onnx"
STATE_PREFIX = "state."


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_export(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(manifest, tensors) of an export folder; anything missing, altered or unreadable is a
    UserError naming the file (the manifest records the tensors file's SHA-256)."""
    folder = Path(folder)
    manifest_path, tensors_path = folder / MANIFEST, folder / TENSORS
    redo = "export the run again (scripts/export.py RUN --out DIR --force)"
    if not manifest_path.is_file():
        raise UserError(f"{folder} is not a nulsq export (no {MANIFEST}); {redo}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{manifest_path} is corrupt ({type(err).__name__}); {redo}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path} is not a {FORMAT} manifest; {redo}")
    if manifest.get("version") != VERSION:
        raise UserError(f"{manifest_path} has format version {manifest.get('version')!r}; this nulsq "
                        f"reads version {VERSION}; {redo}")
    if not tensors_path.is_file():
        raise UserError(f"{tensors_path} is missing; {redo}")
    data = tensors_path.read_bytes()
    if sha256(data) != manifest.get("tensors_sha256"):
        raise UserError(f"{tensors_path} does not match its manifest (SHA-256 differs: corrupt or "
                        f"replaced); {redo}")
    try:
        tensors = load_safetensors(data)
    except (SafetensorError, ValueError) as err:
        raise UserError(f"{tensors_path} is not a readable safetensors file ({err}); {redo}") from None
    return manifest, tensors


def tensor(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """tensors[key], or a UserError saying the export lacks it."""
    if key not in tensors:
        raise UserError(f"the export's {TENSORS} has no tensor '{key}' that its manifest lists; "
                        f"export the run again")
    return tensors[key]
