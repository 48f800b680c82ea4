"""The embedded default job (`python train.py`): FP on digits, then nuLSQ-A 2-bit QAT from it.

The acceptance bar of the quantizer issue: FP top-1 >= 95% on the digits test split, and the 2-bit
model within 3 points of it. Runs the real CLI (about 2.5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_embedded_default_run_reaches_the_accuracy_bar(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "train.py", "logger=none", f"trainer.output_dir={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=880,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert (summary["model"], summary["dataset"], summary["method"], summary["bits"]) == (
        "preresnet20", "digits", "nulsq_a", 2)
    assert summary["fp_top1"] >= 95.0
    assert summary["top1"] >= summary["fp_top1"] - 3.0
    final_line = proc.stdout.strip().splitlines()[-1]
    assert final_line.startswith("final: FP top-1") and "nulsq_a 2-bit top-1" in final_line
    assert "img/s" in proc.stdout and "ETA" in proc.stdout  # the progress line
