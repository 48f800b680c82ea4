"""scripts/bench.py end to end on CPU with small sizes: every table gets its rows and ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_plan_puts_the_wanted_rows_first(bench) -> None:
    cpu = bench.step_plan(torch.device("cpu"), quick=True, models=None, compile=False)
    assert cpu[0][3] == "fp" and cpu[1][3:5] == ("nulsq_a", 2)
    assert [row[5] for row in cpu].count("reference") == 1 and "opaque" not in [r[5] for r in cpu]
    cuda = bench.step_plan(torch.device("cuda"), quick=True, models=None, compile=True)
    assert {row[0] for row in cuda} == {"preresnet20", "preresnet18"}
    assert {(row[1], row[2]) for row in cuda} == {(128, 32), (256, 224)}
    opaque = [row for row in cuda if row[5] == "opaque"]
    assert len(opaque) == 2 and all(row[3:5] == ("nulsq_a", 2) for row in opaque)


@pytest.mark.slow  # about 15 s: five eager ResNet-20 steps timed, tiny op size
def test_bench_cpu_quick_writes_ratios(bench, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--quick", "--numel", "65536", "--budget-s", "120",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    ops = {row["op"]: row for row in result["ops"]}
    assert {"copy y.copy_(x)", "torch fused LSQ op (2-bit)", "ours LSQ 2-bit",
            "ours nuLSQ 2-bit", "ours nuLSQ 4-bit"} <= set(ops)
    assert all(row["vs_memory_floor"] > 0 for row in result["ops"][1:])
    assert ops["torch fused LSQ op (2-bit)"]["vs_torch_fused_lsq"] == 1.0
    steps = result["steps"]
    assert not result["compiled_steps"] and not result["skipped"]
    assert [(r["method"], r["bits"], r["kernels"]) for r in steps] == [
        ("fp", None, "fast"), ("nulsq_a", 2, "fast"), ("lsq", 2, "fast"), ("nulsq_a", 4, "fast"),
        ("nulsq_a", 2, "reference")]
    assert steps[0]["vs_fp"] == 1.0 and all(r["vs_fp"] > 0 and r["ms"] > 0 for r in steps)
    printed = capsys.readouterr().out
    assert "| preresnet20 | 32 | nulsq_a | 2 | fast |" in printed and "x FP" in printed


def test_rival_tables_plan_and_ops(bench, tmp_path: Path) -> None:
    plan = bench.rival_step_plan(torch.device("cpu"), None, [2, 4])
    assert [row[3:5] for row in plan[:2]] == [("fp", 2), ("lsq", 2)]
    assert [row[3] for row in plan].count("fp") == 1 and len(plan) == 2 * len(bench.RIVAL_STEP_METHODS) - 1
    assert all(row[:3] == ("preresnet20", 32, 32) for row in plan)
    out = tmp_path / "rivals.json"
    assert bench.main(["--device", "cpu", "--rivals-only", "--no-steps", "--quick", "--numel", "4096",
                       "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "ops" not in result and "steps" not in result
    rows = {row["op"]: row for row in result["rival_ops"]}
    assert rows["torch fused LSQ op"]["vs_torch_fused_lsq"] == 1.0
    assert {f"{label} 2-bit" for label, _, _ in bench.RIVAL_OPS} <= set(rows)
    assert {f"{label} 2-bit, reference kernels" for label, _, _ in bench.RIVAL_OPS} <= set(rows)
    assert "cpu" in bench.kernels.enabled()  # the A/B rows gave the fast paths back
    assert all(row["ms"] > 0 and row["vs_torch_fused_lsq"] > 0 for row in rows.values())
