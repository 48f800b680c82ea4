"""eval.py: a checkpoint scored again equals the run's own final evaluation; bad inputs are one
line and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nulsq.errors import UserError
from nulsq.evaluation import evaluate_checkpoint

from conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

# QAT only, stopped mid-epoch by max_steps: the checkpoint is the state the run evaluated last.
TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=48", "dataset.batch_size=16",
        "dataset.image_size=8", "trainer.device=cpu", "trainer.log_interval=1", "init.batches=2",
        "quantizer=nulsq_a", "pretrain.epochs=0", "trainer.max_steps=3", "trainer.seed=4"]


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread) -> Path:
    """A tiny nuLSQ-A 2-bit run trained through the real CLI; returns its run directory."""
    out = tmp_path_factory.mktemp("eval") / "run"
    proc = _cli("train.py", "logger=none", *TINY, f"trainer.output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
def test_eval_of_a_run_equals_its_own_final_evaluation(trained):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["stage"] == "qat" and summary["steps"] == 3
    proc = _cli("eval.py", str(trained))
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = json.loads((trained / "checkpoints" / "eval.json").read_text())
    assert (written["top1"], written["top5"]) == (summary["top1"], summary["top5"])  # exactly
    assert written["stage"] == "qat" and written["bits"] == 2 and written["step"] == 3
    assert f"top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}%" in proc.stdout
    assert not list((trained / "checkpoints").glob(".*.tmp"))  # written atomically, no leftovers


@pytest.mark.slow
def test_eval_of_a_checkpoint_file_moved_out_of_its_run_directory(trained, tmp_path):
    # The config travels inside the checkpoint: no run directory is needed.
    alone = tmp_path / "downloaded.pt"
    alone.write_bytes((trained / "checkpoints" / "last.pt").read_bytes())
    result, out = evaluate_checkpoint(alone, device="cpu", out=tmp_path / "scores.json")
    summary = json.loads((trained / "summary.json").read_text())
    assert (result["top1"], result["top5"]) == (summary["top1"], summary["top5"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))


def test_eval_of_a_folder_without_a_checkpoint(tmp_path):
    _one_line_error(_cli("eval.py", str(tmp_path)), "no checkpoint there", str(tmp_path))


@pytest.mark.slow
def test_eval_of_a_checkpoint_from_another_model(trained, tmp_path):
    # preresnet20's weights under a config that says preresnet56
    ckpt = torch.load(trained / "checkpoints" / "last.pt", weights_only=True)
    cfg = OmegaConf.create(ckpt["config"])
    cfg.model.name = "preresnet56"
    ckpt["config"] = OmegaConf.to_yaml(cfg)
    other = tmp_path / "other.pt"
    torch.save(ckpt, other)
    _one_line_error(_cli("eval.py", str(other)), "does not fit the model its config describes",
                    "preresnet56")
    assert not (tmp_path / "eval.json").exists()


def test_eval_of_a_weights_file_that_is_not_a_training_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(UserError, match="not a nulsq training checkpoint"):
        evaluate_checkpoint(path)
