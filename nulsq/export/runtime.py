"""An integer-only reference runtime for nulsq exports, in plain PyTorch: no fake-quant op.

    from nulsq.export.runtime import load_runtime
    model = load_runtime("exports/resnet18_nulsq_2bit")  # an nn.Module in eval mode
    logits = model(images)

The network's graph comes from the model registry (the manifest's config names it); every
quantized layer becomes an `IntegerLayer`, which
1. turns its input into integer codes by comparing against the activation thresholds
   (`torch.bucketize`: level index #{t <= x}, code = code_min + index); the dynamic 8-bit
   quantizers first divide by their step max|x| / Qp, computed from the input tensor as the
   fake-quant model does;
2. computes the layer from codes: for a uniform grid the codes themselves are the operand and the
   step multiplies the result once (integer accumulation, exact: in fp32 while the worst-case sum
   fits in 24 bits, else in fp64); for a non-uniform grid, one lookup of the level table per code;
3. multiplies the accumulated sum by the steps and adds the float bias.
Weight codes are unpacked and looked up once, at load time. Everything else (BatchNorm, pooling,
the residual additions, unquantized layers) runs in float32, as in the fake-quant model.

`load_runtime(folder, mode="float")` keeps steps 1 and the lookups but runs each layer on the
level values in float32, with the fake-quant layer's own op: bit for bit the fake-quant model for
LSQ and nuLSQ (docs/export.md: how equal each mode is).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as TF
from omegaconf import OmegaConf
from torch import nn

from nulsq.errors import UserError
from nulsq.export import format as fmt
from nulsq.export.pack import unpack_codes

EXACT_FP32_SUM = 2**24  # every integer up to this is exact in float32
MODES = ("integer", "float")


class ActCoder(nn.Module):
    """The runtime's activation quantizer: thresholds -> integer codes -> the layer's operand."""

    def __init__(self, spec: dict, levels: torch.Tensor, thresholds: torch.Tensor) -> None:
        super().__init__()
        self.code_min, self.code_max = int(spec["code_min"]), int(spec["code_max"])
        self.dynamic = bool(spec["dynamic"])
        self.authors = spec.get("convention") == "authors"  # code = round(x / max(x) * Qp), unclamped
        self.qp = spec.get("qp")
        self.step = spec["step"]
        self.uniform = self.dynamic or self.step is not None
        if thresholds.numel() != self.code_max - self.code_min or levels.numel() != thresholds.numel() + 1:
            raise UserError(f"export: an activation table has {levels.numel()} levels and "
                            f"{thresholds.numel()} thresholds for codes {self.code_min}..{self.code_max}; "
                            f"export the run again")
        self.register_buffer("thresholds", thresholds.float(), persistent=False)
        self.register_buffer("levels", levels.float(), persistent=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(int64 level indices of x, the dynamic step or None); x's code is index + code_min."""
        x = x.float()
        scale = None
        if self.authors:  # as DynamicMaxQuantizer (authors): codes straight from x, no thresholds
            m = x.amax()
            m = torch.where(m == 0, torch.ones_like(m), m)
            return x.div(m).mul(self.qp).round() - self.code_min, m
        if self.dynamic:  # as DynamicMaxQuantizer.step_of: max over the whole tensor
            scale = (x.abs().amax() / max(self.code_max, 1)).clamp_min(1e-12)
            x = x / scale
        return torch.bucketize(x, self.thresholds, right=True), scale

    def operand(self, index: torch.Tensor, scale: torch.Tensor | None,
                dequantize: bool = False) -> tuple[torch.Tensor, object]:
        """(the operand the layer multiplies, the factor its result is scaled by); dequantize:
        the level values themselves (factor 1), as the fake-quant layer sees them."""
        if not self.uniform or (dequantize and not self.dynamic):  # one table lookup per code
            return torch.take(self.levels, index), 1.0
        codes = index.float()  # integers, exact in fp32 (|code| <= 255)
        if self.code_min:
            codes = codes + self.code_min
        if self.authors:  # scale is m: values code / Qp * m, in the fake quantizer's order
            return (codes.div(self.qp).mul(scale), 1.0) if dequantize else (codes, scale / self.qp)
        if dequantize:
            return codes * scale, 1.0
        return codes, scale if self.dynamic else self.step

    def max_abs_code(self) -> int:
        # The authors' dynamic codes are unclamped below -Qp: bound them generously (|min| of an
        # input up to 8x its max), which only moves the accumulation to fp64 sooner.
        bound = max(abs(self.code_min), abs(self.code_max))
        return 8 * bound if self.authors else bound


def decode_weight(entry: dict, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(int64 weight codes in the weight's shape, level table) of a layer; corrupt ones: UserError."""
    name, spec, shape = entry["name"], entry["weight"], list(entry["weight_shape"])
    try:
        codes = unpack_codes(fmt.tensor(tensors, f"{name}.weight.codes"), spec["bits"],
                             spec["code_min"], int(torch.Size(shape).numel())).reshape(shape)
    except ValueError as err:
        raise UserError(f"export: layer {name}'s weight codes are corrupt ({err}); export the "
                        f"run again") from None
    levels = fmt.tensor(tensors, f"{name}.weight.levels").float()
    if codes.min() < spec["code_min"] or codes.max() > spec["code_max"] or \
            levels.numel() != spec["code_max"] - spec["code_min"] + 1:
        raise UserError(f"export: layer {name}'s weight codes do not fit its level table; "
                        f"export the run again")
    return codes, levels


class IntegerLayer(nn.Module):
    """A quantized Conv2d or Linear computed from integer codes (module docstring).

    mode "integer" (the default): integer accumulation for uniform grids, as described above.
    mode "float": every code is looked up as its level value and the layer runs in float32 on
    those values with the bias inside the op, exactly as the fake-quant layer computes it: the
    output is then the fake-quant model's bit for bit wherever the quantizer's outputs are exactly
    its table (LSQ, nuLSQ, the dynamic 8-bit layers; ulps apart for the rivals' STE forms).
    """

    def __init__(self, entry: dict, tensors: dict[str, torch.Tensor], float_layer: nn.Module,
                 mode: str = "integer") -> None:
        super().__init__()
        if mode not in MODES:
            raise UserError(f"unknown runtime mode '{mode}'; valid: {', '.join(MODES)}")
        self.dequantize = mode == "float"
        self.name, self.kind = entry["name"], entry["type"]
        self.geometry = {k: entry[k] for k in ("stride", "padding", "dilation", "groups") if k in entry}
        shape, name = list(entry["weight_shape"]), self.name
        self.bias = float_layer.bias
        spec = entry["weight"]
        self.weight = None  # a float weight only where the layer is not quantized
        if spec["kind"] == "fp":  # left in float by quantizer.first_last=fp
            self.weight = float_layer.weight
            self.weight_scale, self.weight_uniform, self.max_weight_code = 1.0, False, 0
        else:
            codes, levels = decode_weight(entry, tensors)
            self.weight_uniform = spec["step"] is not None and not self.dequantize
            if self.weight_uniform:  # integer operand, one multiplication by the step
                operand, self.weight_scale = codes.float(), float(spec["step"])
            else:  # one lookup per code, once
                operand, self.weight_scale = levels[codes - spec["code_min"]], 1.0
            self.max_weight_code = int(codes.abs().max())
            self.register_buffer("weight_operand", operand, persistent=False)
        self.act = None
        if entry["act"]["kind"] != "fp":
            self.act = ActCoder(entry["act"], fmt.tensor(tensors, f"{name}.act.levels"),
                                fmt.tensor(tensors, f"{name}.act.thresholds"))
        self.fan_in = int(torch.Size(shape[1:]).numel())

    def _accumulation_dtype(self) -> torch.dtype:
        """fp64 when an exact integer sum could exceed fp32's 24-bit mantissa, else fp32."""
        integer = self.act is not None and self.act.uniform and self.weight_uniform
        if integer and self.act.max_abs_code() * self.max_weight_code * self.fan_in >= EXACT_FP32_SUM:
            return torch.float64
        return torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is None:
            operand, act_scale = x.float(), 1.0
        else:
            operand, act_scale = self.act.operand(*self.act.encode(x), dequantize=self.dequantize)
        weight = self.weight_operand if self.weight is None else self.weight
        if self.dequantize:  # the fake-quant layer's own float op, bias included
            if self.kind == "conv2d":
                return TF.conv2d(operand, weight, self.bias, **self.geometry)
            return TF.linear(operand, weight, self.bias)
        dtype = self._accumulation_dtype()
        if self.kind == "conv2d":
            acc = TF.conv2d(operand.to(dtype), weight.to(dtype), None, **self.geometry)
        else:
            acc = TF.linear(operand.to(dtype), weight.to(dtype))
        y = (acc * (act_scale * self.weight_scale)).float()
        if self.bias is not None:
            y = y + (self.bias.view(-1, 1, 1) if self.kind == "conv2d" else self.bias)
        return y


def load_runtime(folder: str | Path, mode: str = "integer") -> nn.Module:
    """The exported network, every quantized layer an `IntegerLayer` in `mode` ("integer": integer
    accumulation; "float": level values in float32, as the fake-quant layers), eval mode, CPU."""
    if mode not in MODES:
        raise UserError(f"unknown runtime mode '{mode}'; valid: {', '.join(MODES)}")
    return assemble(folder, lambda entry, tensors, layer: IntegerLayer(entry, tensors, layer, mode))


def assemble(folder: str | Path, make_layer: Callable[[dict, dict, nn.Module], nn.Module]) -> nn.Module:
    """The exported network, its float tensors loaded, every quantized layer replaced by
    make_layer(entry, tensors, float_layer) (float_layer: the architecture's own layer, holding
    the bias, and the weight where that stays in float); a corrupt or mismatching export is a
    UserError."""
    manifest, tensors = fmt.read_export(folder)
    model = _float_model(manifest)
    state = {k[len(fmt.STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(fmt.STATE_PREFIX)}
    coded = {f"{e['name']}.weight" for e in manifest["layers"] if e["weight"]["kind"] != "fp"}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise UserError(f"export {folder}: its float tensors do not fit model {manifest['model']['name']} "
                        f"({str(err).splitlines()[0]}); export the run again") from None
    if unexpected or set(missing) != coded:
        odd = sorted(set(unexpected) | (set(missing) ^ coded))
        raise UserError(f"export {folder}: its float tensors do not match model {manifest['model']['name']} "
                        f"({', '.join(odd[:3])}); export the run again")
    for entry in manifest["layers"]:
        float_layer = model.get_submodule(entry["name"])
        if list(float_layer.weight.shape) != list(entry["weight_shape"]):
            raise UserError(f"export: layer {entry['name']} has weight shape {entry['weight_shape']} but "
                            f"model {manifest['model']['name']} builds {list(float_layer.weight.shape)}")
        model.set_submodule(entry["name"], make_layer(entry, tensors, float_layer))
    return model.eval()


@torch.no_grad()
def compare_predictions(reference: nn.Module, runtime: nn.Module, batches: Iterable) -> dict:
    """Top-1 of both models and how many predictions agree, over (images, labels) batches (the
    same batches for both: the dynamic 8-bit layers' step depends on the whole batch)."""
    images_seen = agree = right_reference = right_runtime = 0
    for images, labels in batches:
        expected, got = reference(images).argmax(1), runtime(images).argmax(1)
        agree += int((expected == got).sum())
        right_reference += int((expected == labels).sum())
        right_runtime += int((got == labels).sum())
        images_seen += labels.numel()
    n = max(images_seen, 1)
    return {"images": images_seen, "agree": agree, "fake_quant_top1": 100 * right_reference / n,
            "runtime_top1": 100 * right_runtime / n}


def _float_model(manifest: dict) -> nn.Module:
    """The architecture the manifest's config names, unquantized and without pretrained weights."""
    from nulsq.train.build import build_model

    cfg = OmegaConf.create(manifest["config"])
    model, _ = build_model(cfg, num_classes=manifest["model"]["num_classes"], quantized=False,
                           verbose=False, load_pretrained=False,
                           image_size=manifest["model"]["image_size"])
    return model
