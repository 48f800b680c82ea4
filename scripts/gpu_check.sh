#!/usr/bin/env bash
# The GPU check of the fast quantizer kernels (issue 8), in one go on a CUDA machine:
#   1. the CUDA and torch.compile tests of tests/test_kernels.py and tests/test_functional.py
#      (Triton kernels against the reference kernels, torch.compile, CUDA-graph capture, a compiled
#      quantized ResNet-20 step);
#   2. scripts/bench.py: op level (ours vs PyTorch's fused LSQ op vs a copy, ratio to the memory
#      floor) and training steps (FP vs LSQ vs nuLSQ-A, pre-act ResNet-20 b128 and ResNet-18 b256).
# Usage (the project's dependencies already installed):
#   OUT=/some/folder bash scripts/gpu_check.sh     # also writes $OUT/bench.json and $OUT/tests.log
#   OUT=/some/folder bash scripts/gpu_check.sh rivals   # the rival quantizers' tables instead:
#       scripts/bench.py --rivals-only, compiled (the targets: every rival <= 1.3x the compiled
#       FP step) then eager, into $OUT/bench_rivals_compiled.json and $OUT/bench_rivals_eager.json
# Each finishes in under 9 minutes: each part has a hard time limit, and the benchmark skips (and
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

if [ "${1:-}" = "rivals" ]; then
    rc=0
    # compiling eight configurations takes most of the time: it gets the larger share
    # (the op table, eager either way, comes with the first part only)
    for part in "compiled on 330 380" "eager off 90 130 --no-ops"; do
        read -r mode compile budget limit extra <<<"$part"
        echo "== rivals, $mode =="
        args=(--rivals-only --budget-s "$budget" --compile "$compile" $extra)
        [ -n "$out" ] && args+=(--out "$out/bench_rivals_$mode.json")
        timeout "$limit" python scripts/bench.py "${args[@]}" || rc=$?
    done
    echo "rivals rc=$rc (124 = hit the time limit); total $((SECONDS - start)) s"
    exit "$rc"
fi

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
