#!/usr/bin/env bash
# The GPU check of the fast quantizer kernels (issue 8), in one go on a CUDA machine:
#   1. the CUDA and torch.compile tests of tests/test_kernels.py and tests/test_functional.py
#      (Triton kernels against the reference kernels, torch.compile, CUDA-graph capture, a compiled
#      quantized ResNet-20 step);
#   2. scripts/bench.py: op level (ours vs PyTorch's fused LSQ op vs a copy, ratio to the memory
#      floor) and training steps (FP vs LSQ vs nuLSQ-A, pre-act ResNet-20 b128 and ResNet-18 b256).
# Usage (the project's dependencies already installed):
#   OUT=/some/folder bash scripts/gpu_check.sh     # also writes $OUT/bench.json and $OUT/tests.log
# Finishes in under 8 minutes: each part has a hard time limit, and the benchmark skips (and
# lists) the step configurations that do not fit its budget.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled
out="${OUT:-}"
log="${out:-/tmp}/tests.log"
[ -n "$out" ] && mkdir -p "$out"
start=$SECONDS

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory --format=csv,noheader || true
python - <<'EOF'
import sys, torch
try:
    import triton; tv = triton.__version__
except ImportError:
    tv = "missing"
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {tv}, device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
EOF

echo "== tests (CUDA + compile) =="
timeout 220 python -m pytest -q -rs -p no:cacheprovider --timeout=150 --durations=8 \
    tests/test_kernels.py tests/test_functional.py -k "cuda or compile" >"$log" 2>&1
tests_rc=$?
grep -E "passed|failed|error" "$log" | tail -3
if [ "$tests_rc" -ne 0 ]; then
    echo "-- failures (rc=$tests_rc; 124 = hit the time limit); full log: $log --"
    grep -nE "^(FAILED|ERROR)|Error|assert" "$log" | head -40
    tail -60 "$log"
else
    sed -n '/slowest/,/^$/p' "$log"
fi
echo "tests took $((SECONDS - start)) s"

echo "== benchmark =="
bench_args=(--budget-s 190)
[ -n "$out" ] && bench_args+=(--out "$out/bench.json")
timeout 250 python scripts/bench.py "${bench_args[@]}"
bench_rc=$?
echo "benchmark rc=$bench_rc (124 = hit the time limit); total $((SECONDS - start)) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
