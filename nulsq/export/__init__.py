"""Export of trained quantized runs: integer weight codes, learned level tables and activation
thresholds (`exporter`, `levels`, `pack`, `format`), an integer-only reference runtime (`runtime`)
and an ONNX export in standard operators (`onnx`). See docs/export.md."""
