"""A multirun through the real CLI: a diverging job is recorded and the sweep goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=none", "dataset=synthetic", "dataset.num_train=32", "dataset.num_val=16",
        "dataset.batch_size=16", "dataset.image_size=16", "trainer.device=cpu", "trainer.epochs=1",
        "trainer.log_interval=1", "init.batches=1", "pretrain.epochs=0"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # No -m: the hparams file makes it a multirun. trainer.seed=0 narrows seeds.yaml to one seed,
    # and the two learning rates make two jobs, the first of which diverges (NaN loss).
    sweep = tmp_path / "sweep"
    proc = _cli(*TINY, "hparams=seeds", "trainer.seed=0", "optim.weights.lr=1e30,0.01",
                f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: sweep {sweep}: 1 of 2 jobs failed (job 0; job 0: NaNLossError")

    failed = json.loads((sweep / "0" / "summary.json").read_text())
    assert failed["status"] == "failed" and failed["error"].startswith("NaNLossError: training loss")
    assert "job failed: training loss became nan" in (sweep / "0" / "train.log").read_text()
    done = json.loads((sweep / "1" / "summary.json").read_text())
    assert done["status"] == "finished" and done["top1"] is not None
    # the console lines of the job that ran reach its train.log through the logging module
    log = (sweep / "1" / "train.log").read_text()
    assert "[qat] epoch 1/1 step 2/2" in log and "final: FP top-1" in log


@pytest.mark.slow
def test_failure_before_the_run_directory_is_recorded_in_the_job_folder(tmp_path):
    # A bad path fails while the data is built, before the trainer writes any summary.
    sweep = tmp_path / "sweep"
    proc = _cli("-m", *TINY, "dataset=synthetic,imagenet", f"dataset.root={tmp_path / 'nowhere'}",
                f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "1 of 2 jobs failed (job 1; job 1: UserError" in proc.stderr.strip().splitlines()[-1]
    assert json.loads((sweep / "0" / "summary.json").read_text())["status"] == "finished"
    failed = json.loads((sweep / "1" / "summary.json").read_text())
    assert failed["status"] == "failed" and "nowhere" in failed["error"]


@pytest.mark.slow
def test_a_sweep_without_failures_exits_zero(tmp_path):
    sweep = tmp_path / "sweep"
    # a failed job of an earlier sweep into the same folder is not this sweep's
    stale = sweep / "7"
    (stale / ".hydra").mkdir(parents=True)
    (stale / ".hydra" / "config.yaml").write_text("{}")
    (stale / "summary.json").write_text(json.dumps({"status": "failed", "error": "old"}))
    os.utime(stale / ".hydra" / "config.yaml", (1_000_000, 1_000_000))
    proc = _cli(*TINY, "hparams=seeds", "trainer.seed=0", "trainer.max_steps=1",
                f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"sweep {sweep}: all 1 jobs finished"
