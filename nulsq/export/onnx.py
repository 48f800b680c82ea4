"""ONNX export of the fake-quantized model, in standard operators only (no custom domain).

    from nulsq.export.onnx import export_onnx
    export_onnx("exports/r18")   # writes exports/r18/model.onnx from the export in that folder

Built from an export folder, every quantized layer becomes
- uniform activation grids (LSQ, PACT, DoReFa) of layers with uniform weights: [Clip to the b-bit
  range] -> QuantizeLinear -> DequantizeLinear, with the learned step as scale; the dynamic 8-bit
  quantizers compute their scale in the graph (ReduceMax(Abs(x)) / Qp) from the input, as the
  fake-quant model does;
- other activation grids (nuLSQ, LCQ, APoT, LQ-Nets; uniform ones before non-uniform weights,
  which onnxruntime would otherwise re-quantize to int8 as QDQ weights): the lookup of the runtime written as
  standard ops: GreaterOrEqual against the thresholds, ReduceSum (the code), Gather on the levels;
- weights: the integer codes as an int8 initializer, then DequantizeLinear (uniform grids) or
  Gather on the level table (non-uniform ones);
then the Conv / Gemm in float. Needs the optional extra `pip install .[export]` (onnx, onnxruntime)
to check and run the file; torch writes it with its TorchScript-based exporter.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn.functional as TF
from torch import nn

from nulsq.errors import UserError
from nulsq.export import format as fmt
from nulsq.export.runtime import assemble, decode_weight
from nulsq.train.checkpoint import atomic_write_bytes

OPSET = 13


def _int_type(low: int, high: int) -> torch.dtype:
    return torch.uint8 if low >= 0 else torch.int8


class _QuantDequant(torch.autograd.Function):
    """round(clamp(x / s, low, high)) * s; in ONNX [Clip of x to [low s, high s], when the b-bit
    range is narrower than int8/uint8] -> QuantizeLinear -> DequantizeLinear. (A Clip of the int8
    codes between the two is what one would write, but onnxruntime's graph optimisations drop it.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: torch.Tensor, low: int, high: int) -> torch.Tensor:
        return torch.clamp(torch.round(x / scale), low, high) * scale

    @staticmethod
    def symbolic(g, x, scale, low: int, high: int):
        dtype = _int_type(low, high)
        zero = g.op("Constant", value_t=torch.zeros((), dtype=dtype))
        info = torch.iinfo(dtype)
        if (low, high) != (info.min, info.max):
            x = g.op("Clip", x, g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(low)))),
                     g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(high)))))
        q = g.op("QuantizeLinear", x, scale, zero)
        return g.op("DequantizeLinear", q, scale, zero)


class _Dequant(torch.autograd.Function):
    """codes * s from int8 codes; in ONNX one DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale

    @staticmethod
    def symbolic(g, codes, scale):
        zero = g.op("Constant", value_t=torch.zeros((), dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero)


class OnnxActQuant(nn.Module):
    """An activation quantizer in exportable ops (module docstring)."""

    def __init__(self, spec: dict, levels: torch.Tensor, thresholds: torch.Tensor, qdq: bool) -> None:
        super().__init__()
        self.low, self.high = int(spec["code_min"]), int(spec["code_max"])
        self.dynamic = bool(spec["dynamic"])
        self.authors, self.qp = spec.get("convention") == "authors", spec.get("qp")
        self.uniform = self.dynamic or (qdq and spec["step"] is not None)
        self.register_buffer("step", torch.tensor(float(spec["step"] or 1.0)), persistent=False)
        self.register_buffer("thresholds", thresholds.float(), persistent=False)
        self.register_buffer("levels", levels.float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.authors:  # ReduceMax, Div, Mul, Round: unclamped codes, the quantizer's op order
            m = x.amax()
            m = torch.where(m == 0, torch.ones_like(m), m)
            return x.div(m).mul(self.qp).round().div(self.qp).mul(m)
        if self.dynamic:
            step = torch.clamp(x.abs().amax() / max(self.high, 1), min=1e-12)
            return _QuantDequant.apply(x, step, self.low, self.high)
        if self.uniform:
            return _QuantDequant.apply(x, self.step, self.low, self.high)
        index = (x.unsqueeze(-1) >= self.thresholds).sum(-1)
        return self.levels[index]


class OnnxLayer(nn.Module):
    """A quantized Conv2d / Linear in exportable ops: codes -> weights, activation quantizer, op."""

    def __init__(self, entry: dict, tensors: dict[str, torch.Tensor], float_layer: nn.Module) -> None:
        super().__init__()
        self.kind = entry["type"]
        self.geometry = {k: entry[k] for k in ("stride", "padding", "dilation", "groups") if k in entry}
        spec = entry["weight"]
        self.bias = float_layer.bias
        self.weight = None
        if spec["kind"] == "fp":
            self.weight = float_layer.weight
        else:
            codes, levels = decode_weight(entry, tensors)
            fits_int8 = int(codes.min()) >= -128 and int(codes.max()) <= 127
            # Codes beyond int8 (the authors' unclamped 8-bit weights) take the table lookup.
            self.code_min, self.uniform = int(spec["code_min"]), spec["step"] is not None and fits_int8
            # Parameters, not buffers: the exporter writes them as initializers and keeps the
            # lookups that use them (it would fold buffer expressions into float weights).
            frozen = lambda t: nn.Parameter(t, requires_grad=False)  # noqa: E731
            self.codes = frozen(codes.to(torch.int8 if fits_int8 else torch.int16))
            self.weight_levels = frozen(levels)
            self.weight_step = frozen(torch.tensor(float(spec["step"] or 1.0)))
        self.act = None
        if entry["act"]["kind"] != "fp":
            # QDQ activations only before QDQ weights: onnxruntime's WeightBiasQuantization
            # re-quantizes a float weight (a non-uniform table) behind a DequantizeLinear input to int8.
            self.act = OnnxActQuant(entry["act"], fmt.tensor(tensors, f"{entry['name']}.act.levels"),
                                    fmt.tensor(tensors, f"{entry['name']}.act.thresholds"),
                                    qdq=self.weight is None and self.uniform)

    def quantized_weight(self) -> torch.Tensor:
        if self.weight is not None:
            return self.weight
        if self.uniform:
            return _Dequant.apply(self.codes, self.weight_step)
        return self.weight_levels[self.codes.long() - self.code_min]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = self.act(x)
        if self.kind == "conv2d":
            return TF.conv2d(x, self.quantized_weight(), self.bias, **self.geometry)
        return TF.linear(x, self.quantized_weight(), self.bias)


def onnx_twin(folder: str | Path) -> nn.Module:
    """The exported network with every quantized layer an `OnnxLayer` (plain PyTorch, eval mode)."""
    return assemble(folder, OnnxLayer)


def export_onnx(folder: str | Path, out: str | Path | None = None) -> Path:
    """Write the ONNX file of the export in `folder` (default `folder/model.onnx`); returns its path.

    The batch dimension is dynamic; the image side is the run's. The file is checked with
    onnx.checker before it is written.
    """
    try:
        import onnx
    except ImportError:
        raise UserError("ONNX export needs the optional packages: pip install .[export]") from None
    folder = Path(folder)
    out = Path(out) if out is not None else folder / fmt.ONNX
    manifest, _ = fmt.read_export(folder)
    model = onnx_twin(folder)
    side = int(manifest["model"]["image_size"] or 224)
    example = torch.zeros(1, 3, side, side)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (example,), buffer, dynamo=False, opset_version=OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                          do_constant_folding=False)  # keep int8 codes + lookups in the file
    data = buffer.getvalue()
    onnx.checker.check_model(onnx.load_from_string(data))
    atomic_write_bytes(out, data)
    return out
