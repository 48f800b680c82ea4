"""Export a trained quantized run: integer weight codes packed to their bit width, level tables,
activation thresholds, the tensors kept in float, and a JSON manifest (docs/export.md).

What is stored per quantized layer (QuantConv2d / QuantLinear):
- weight: its codes (the fake-quantized weight's level indices, packed), the level table;
- activation (the layer's input): level table and decision thresholds (`levels.activation_table`);
  the dynamic 8-bit quantizers of the first/last layers store their thresholds in units of the
  step, which the runtime computes from each input tensor's max, as the fake-quant model does.
Biases and BatchNorm are kept, in float32, where the model has them (not folded: a BatchNorm
folded into a quantized weight would change its codes, and pre-activation ResNets normalise
before the convolution). Layers the config leaves unquantized keep their float weights.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save as save_safetensors
from torch import nn

from nulsq.errors import UserError
from nulsq.export import format as fmt
from nulsq.export.levels import QuantTable, activation_table, weight_table
from nulsq.export.pack import pack_codes
from nulsq.quant.base import Quantizer
from nulsq.quant.convert import QuantConv2d, QuantLinear
from nulsq.rundir import CHECKPOINT_DIR, last_checkpoint, read_summary
from nulsq.train.checkpoint import atomic_write_bytes, atomic_write_json

QUANT_LAYERS = (QuantConv2d, QuantLinear)


# -- reading a run -----------------------------------------------------------------------------------

def read_checkpoint(path: Path) -> dict:
    """A training checkpoint, read as the trainer reads one (`nulsq.train.checkpoint.load_checkpoint`:
    weights_only, tensors and plain data only, never code); anything else is a UserError."""
    from nulsq.train.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    if "stage" not in ckpt:
        raise UserError(f"{path} is not a nulsq training checkpoint (no stage entry); pass a run "
                        f"directory or its checkpoints/last.pt")
    return ckpt


def locate_run(source: str | Path) -> tuple[Path, Path]:
    """(run directory, checkpoint) of a run directory or of a checkpoint file inside one."""
    source = Path(source)
    if source.is_dir():
        ckpt = last_checkpoint(source)
        if not ckpt.is_file():
            raise UserError(f"{source} has no {ckpt.relative_to(source)}; pass a run directory of "
                            f"train.py or a checkpoint file")
        return source, ckpt
    if source.is_file():
        run_dir = source.parent.parent if source.parent.name == CHECKPOINT_DIR else source.parent
        return run_dir, source
    raise UserError(f"{source} does not exist; pass a run directory or a checkpoint file")


def load_trained(source: str | Path) -> tuple[nn.Module, object, dict]:
    """(quantized model in eval mode on the CPU, config, run info) of a finished QAT run.

    The config is the one the checkpoint was trained with (`nulsq.rundir.checkpoint_config`: its
    own copy, else its run's config.yaml). Refuses, one line each: a full-precision run, an
    unfinished run, a checkpoint of the FP stage, a checkpoint with no config anywhere.
    """
    from nulsq.rundir import build_checkpoint_model, checkpoint_config

    run_dir, ckpt_path = locate_run(source)
    ckpt = read_checkpoint(ckpt_path)
    cfg = checkpoint_config(ckpt_path, ckpt)
    if cfg.quantizer.weight is None and cfg.quantizer.act is None:
        raise UserError(f"{run_dir} is a full-precision run (quantizer {cfg.quantizer.name}): nothing "
                        f"to export as integer codes; export a quantized (QAT) run")
    summary = read_summary(run_dir)
    if summary.get("status") != "finished":
        status = summary.get("status", "no summary.json")
        raise UserError(f"{run_dir} is not a finished run (status: {status}); "
                        f"finish it with trainer.resume=auto, then export")
    if ckpt["stage"] != "qat":
        raise UserError(f"{ckpt_path} is a checkpoint of the full-precision stage; export a finished "
                        f"QAT run")
    model = build_checkpoint_model(ckpt_path, ckpt, cfg)  # the trainer's construction, checked
    info = {"run_dir": str(run_dir), "checkpoint": str(ckpt_path), "num_classes": ckpt["num_classes"],
            "image_size": ckpt.get("image_size"), "top1": summary.get("top1")}
    return model.eval(), cfg, info


# -- building the export -----------------------------------------------------------------------------

def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The QuantConv2d/QuantLinear layers of `model` by name, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def _layer_geometry(layer: nn.Module) -> dict:
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros":
            raise UserError(f"cannot export a convolution with padding_mode={layer.padding_mode!r}")
        return {"type": "conv2d", "stride": list(layer.stride), "padding": list(layer.padding),
                "dilation": list(layer.dilation), "groups": layer.groups}
    return {"type": "linear"}


def _table_tensors(prefix: str, table: QuantTable) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.levels": table.levels.float().contiguous()}
    if table.thresholds.numel():
        tensors[f"{prefix}.thresholds"] = table.thresholds.float().contiguous()
    return tensors


@torch.no_grad()
def build_export(model: nn.Module) -> tuple[list[dict], dict[str, torch.Tensor], dict]:
    """(per-layer manifest entries, tensors, sizes in bytes) of a quantized model in eval mode."""
    model = model.cpu().eval()
    layers, tensors = [], {}
    coded: set[str] = set()  # state_dict keys replaced by codes or tables
    quantized_fp32 = packed = tables = 0
    for name, layer in quantized_layers(model).items():
        entry = {"name": name, **_layer_geometry(layer), "weight_shape": list(layer.weight.shape),
                 "bias": layer.bias is not None}
        coded.update(f"{name}.{k}" for k in (*_quantizer_keys(layer, "weight_quant"),
                                             *_quantizer_keys(layer, "act_quant")))
        if isinstance(layer.weight_quant, Quantizer):
            table, codes = weight_table(layer.weight_quant, layer.weight)
            codes_packed = pack_codes(codes, table.bits, table.code_min)
            tensors[f"{name}.weight.codes"] = codes_packed
            tensors.update(_table_tensors(f"{name}.weight", table))
            entry["weight"] = {**table.describe(), "packed_bytes": codes_packed.numel()}
            coded.add(f"{name}.weight")
            quantized_fp32 += 4 * layer.weight.numel()
            packed += codes_packed.numel()
            tables += 4 * (table.levels.numel() + table.thresholds.numel())
        else:
            entry["weight"] = {"kind": "fp"}
        if isinstance(layer.act_quant, Quantizer):
            table = activation_table(layer.act_quant)
            tensors.update(_table_tensors(f"{name}.act", table))
            entry["act"] = table.describe()
            tables += 4 * (table.levels.numel() + table.thresholds.numel())
        else:
            entry["act"] = {"kind": "fp"}
        layers.append(entry)
    float_bytes = 0
    for key, value in model.state_dict().items():
        if key in coded:
            continue
        tensors[fmt.STATE_PREFIX + key] = value.detach().cpu().contiguous()
        if value.is_floating_point():
            float_bytes += 4 * value.numel()
    fp32 = float_bytes + quantized_fp32
    total = packed + float_bytes + tables
    sizes = {
        "fp32_bytes": fp32, "packed_weight_bytes": packed, "quantized_weights_fp32_bytes": quantized_fp32,
        "float_bytes": float_bytes, "table_bytes": tables, "total_bytes": total,
        "ratio": fp32 / max(total, 1), "weight_ratio": quantized_fp32 / max(packed, 1),
    }
    return layers, tensors, sizes


def _quantizer_keys(layer: nn.Module, attr: str) -> list[str]:
    return [f"{attr}.{k}" for k in getattr(layer, attr).state_dict()]


def prepare_folder(out: Path, force: bool) -> None:
    """Create `out`; an existing non-empty folder only with force (then its export files go)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--out {out} exists and is not empty; pass --force to overwrite the "
                            f"export in it, or choose another folder")
        for stale in (fmt.MANIFEST, fmt.ONNX):  # the manifest first: no half-old export remains
            (out / stale).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def export_model(model: nn.Module, cfg, info: dict, out: str | Path, force: bool = False) -> dict:
    """Write the export of a quantized model to `out`; returns the manifest.

    Args:
        model: the quantized network (QuantConv2d/QuantLinear layers), loaded with its weights.
        cfg: its run config (the runtime rebuilds the architecture from cfg.model).
        info: run facts for the manifest: num_classes and image_size (required), run_dir,
            checkpoint, top1 (optional).
        out: the export folder.
        force: overwrite an existing non-empty folder.
    """
    out = Path(out)
    prepare_folder(out, force)
    layers, tensors, sizes = build_export(model)
    if not layers:
        raise UserError("the model has no quantized layer; export a quantized (QAT) run")
    data = save_safetensors(tensors)
    sizes["file_bytes"] = len(data)
    manifest = {
        "format": fmt.FORMAT, "version": fmt.VERSION,
        "model": {"name": cfg.model.name, "num_classes": info["num_classes"],
                  "image_size": info["image_size"]},
        "method": {"name": cfg.quantizer.name, "bits": cfg.quantizer.bits,
                   "first_last": cfg.quantizer.first_last},
        "source": {k: info.get(k) for k in ("run_dir", "checkpoint", "top1")},
        "batchnorm": "kept in float32 (not folded)",
        "bias": "kept in float32, added after the layer's scaled accumulation",
        "dynamic_act": ("computed at run time over the whole input tensor (the batch): 'authors' "
                        "convention code = round(x / max(x) * Qp), unclamped, value code / Qp * max(x); "
                        "'absmax' step = max|x| / Qp on the clamped grid"),
        "tensors": fmt.TENSORS, "tensors_sha256": fmt.sha256(data),
        "sizes": sizes,
        "layers": layers,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    atomic_write_bytes(out / fmt.TENSORS, data)
    atomic_write_json(out / fmt.MANIFEST, manifest)
    return manifest


def export_run(source: str | Path, out: str | Path, force: bool = False) -> dict:
    """Load a finished QAT run (a run directory or its checkpoint) and export it to `out`."""
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not force:
        prepare_folder(out, force)  # fail before the (slower) model loading
    model, cfg, info = load_trained(source)
    return export_model(model, cfg, info, out, force)
