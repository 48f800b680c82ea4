"""Export a trained quantized run as integer weight codes, level tables and thresholds.

    python scripts/export.py runs/table5_resnet18_2bit/nulsq_wa_2bit_seed0/20250101-120000 --out exports/r18
    python scripts/export.py RUN/checkpoints/last.pt --out DIR --force --onnx --verify

Writes DIR/manifest.json and DIR/tensors.safetensors (docs/export.md), with --onnx also
DIR/model.onnx, and prints the model size: FP32 bytes, packed bytes and their ratio; --verify
then runs the runtime (integer and float modes) and the fake-quant model on the run's evaluation
split and prints their top-1s. Run the export with `nulsq.export.runtime.load_runtime(DIR)`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from nulsq.cli import script_exit_code


def describe(manifest: dict, out: Path, seconds: float) -> str:
    """The lines printed after an export: what was written and how large it is."""
    s = manifest["sizes"]
    return "\n".join([
        f"exported {len(manifest['layers'])} quantized layers of {manifest['model']['name']} "
        f"({manifest['method']['name']}, {manifest['method']['bits']} bits) to {out} in {seconds:.2f} s",
        f"  FP32 model:      {s['fp32_bytes']:>12,} bytes",
        f"  packed weights:  {s['packed_weight_bytes']:>12,} bytes (their FP32: "
        f"{s['quantized_weights_fp32_bytes']:,}, ratio {s['weight_ratio']:.1f}x)",
        f"  kept in float:   {s['float_bytes']:>12,} bytes (BatchNorm, biases, unquantized layers)",
        f"  level tables:    {s['table_bytes']:>12,} bytes",
        f"  total:           {s['total_bytes']:>12,} bytes, ratio {s['ratio']:.2f}x "
        f"(file {s['file_bytes']:,} bytes)",
    ])


def verify(source: Path, out: Path) -> str:
    """Evaluate the fake-quant model and the integer runtime on the run's evaluation split."""
    import torch

    from nulsq.data import build as build_data
    from nulsq.export.exporter import load_trained
    from nulsq.export.runtime import compare_predictions, load_runtime

    model, cfg, _ = load_trained(source)
    data = build_data(cfg.dataset, torch.device("cpu"), int(cfg.trainer.seed))
    lines = []
    for mode in ("integer", "float"):
        r = compare_predictions(model, load_runtime(out, mode), data.val)
        lines.append(f"  verify ({mode} runtime): fake-quant top-1 {r['fake_quant_top1']:.2f}%, runtime "
                     f"top-1 {r['runtime_top1']:.2f}%, predictions agree on {r['agree']}/{r['images']} "
                     f"images")
    return "\n".join(lines)


def run(source: Path, out: Path, force: bool, onnx: bool, check: bool = False) -> str:
    from nulsq.export.exporter import export_run

    start = time.perf_counter()
    manifest = export_run(source, out, force)
    lines = describe(manifest, out, time.perf_counter() - start)
    if check:
        lines += "\n" + verify(source, out)
    if onnx:
        from nulsq.export.onnx import export_onnx

        start = time.perf_counter()
        path = export_onnx(out)
        lines += f"\n  ONNX:            {path} ({time.perf_counter() - start:.2f} s)"
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a finished QAT run directory, or its checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the export folder to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing export in --out")
    parser.add_argument("--onnx", action="store_true",
                        help="also write model.onnx (needs the optional extra: pip install .[export])")
    parser.add_argument("--verify", action="store_true",
                        help="evaluate the integer runtime against the fake-quant model on the run's "
                             "evaluation split (needs the dataset)")
    args = parser.parse_args(argv)
    return script_exit_code(
        lambda: print(run(args.source, args.out, args.force, args.onnx, args.verify)), f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
