"""The trainer: schedule maths, run files, resume, config validation, value checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

from nulsq.config import validate
from nulsq.errors import UserError
from nulsq.quant import kernels
from nulsq.train import run
from nulsq.train.optim import lr_factor

from conftest import compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_warmup_then_cosine_matches_hand_computation():
    # Supplement C-II: lr rises linearly from 1e-5 to 4e-2 over 10 epochs, then cosine to zero.
    lr, warm_lr, spe, epochs = 4e-2, 1e-5, 100, 300
    total, warm = spe * epochs, 10 * spe
    lr_at = lambda step: lr * lr_factor(step, total, warm, warm_lr / lr, "cosine")  # noqa: E731
    assert lr_at(0) == pytest.approx(1e-5)
    assert lr_at(500) == pytest.approx(1e-5 + (4e-2 - 1e-5) * 0.5)
    assert lr_at(1000) == pytest.approx(4e-2)
    # halfway through the cosine part: (1 + cos(pi/2)) / 2 = 0.5
    assert lr_at(1000 + 14500) == pytest.approx(2e-2)
    assert lr_at(1000 + 29000 * 0.25) == pytest.approx(4e-2 * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(total) == pytest.approx(0.0, abs=1e-12)


def test_scheduler_drives_optimizer_lr_per_step(tiny_run, tmp_path):
    cfg = compose_config(tiny_run("quantizer=fp", "trainer.epochs=2", "schedule.warmup_epochs=1",
                                  "schedule.warmup_lr=0.001", "optim.weights.lr=0.1"))
    run(cfg)
    steps = [e for e in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "step"]
    # 4 steps per epoch, logged every 2: lrs after steps 2, 4, 6, 8 (the scheduler has stepped)
    expected = [0.001 + (0.1 - 0.001) * 2 / 4, 0.1,
                0.1 * (1 + math.cos(math.pi * 2 / 4)) / 2, 0.0]
    assert [e["lr/weights"] for e in steps] == pytest.approx(expected, abs=1e-9)


def test_two_epoch_run_writes_every_run_file(tiny_run, tmp_path):
    cfg = compose_config(tiny_run("trainer.epochs=2", "pretrain.epochs=1"))
    summary = run(cfg)
    out = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    written = json.loads((out / "summary.json").read_text())
    assert written["status"] == "finished" and written == json.loads(json.dumps(summary))
    for key in ("top1", "best_top1", "fp_top1", "seed", "wall_time_s", "images_per_s"):
        assert key in written
    assert written["runtime"] == {
        "device": "cpu", "world_size": 1, "bf16": False, "channels_last": False, "compile": False,
        "fast_kernels": kernels.enabled(), "torch": torch.__version__}
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("epoch") == 3 and "init" in events and "quantizers" in events
    resolved = OmegaConf.load(out / "config.yaml")
    assert resolved.quantizer.name == "nulsq_a" and resolved.trainer.epochs == 2
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["stage"] == "qat" and ckpt["state"]["epoch"] == 2
    assert set(ckpt["optimizers"]) == {"weights", "quant"}


def _final_weights(path):
    return torch.load(path, weights_only=False)["model"]


# 4 steps per epoch; max_steps counts per stage: QAT cut mid-epoch 2, FP cut mid-epoch, QAT only
@pytest.mark.parametrize("pretrain, stop_at", [(1, 5), (1, 3), (0, 3)])
def test_resume_after_stop_reproduces_uninterrupted_run(tiny_run, tmp_path, pretrain, stop_at):
    common = ("trainer.epochs=2", f"pretrain.epochs={pretrain}", "quantizer=nulsq_a", "trainer.seed=3")
    run(compose_config(tiny_run(*common, out=tmp_path / "full")))
    run(compose_config(tiny_run(*common, f"trainer.max_steps={stop_at}", out=tmp_path / "cut")))
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "stopped"
    run(compose_config(tiny_run(*common, "trainer.resume=auto", out=tmp_path / "cut")))
    full = _final_weights(tmp_path / "full" / "checkpoints" / "last.pt")
    resumed = _final_weights(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert (a["top1"], a["best_top1"], a["steps"]) == (b["top1"], b["best_top1"], b["steps"])


def test_resume_refuses_checkpoint_of_another_config(tiny_run, tmp_path):
    run(compose_config(tiny_run("quantizer=fp", "trainer.epochs=1")))
    with pytest.raises(UserError, match="different config"):
        run(compose_config(tiny_run("quantizer=fp", "trainer.epochs=1", "optim.weights.lr=0.5",
                                    "trainer.resume=auto")))


def test_typo_in_a_key_fails_with_the_key_named():
    with pytest.raises(UserError, match="trainer.epochz"):
        validate({"trainer": {"epochz": 3}})
    with pytest.raises(UserError, match="optim.quant.lr"):
        validate({"optim": {"quant": {"lr": "fast"}}})
    with pytest.raises(Exception, match="epochz"):  # on the command line, Hydra refuses it first
        compose_config(["trainer.epochz=3"])


@pytest.mark.parametrize("override, message", [
    ("optim.weights.lr=0", "optim.weights.lr must be > 0"),
    ("optim.quant.lr=-1", "optim.quant.lr must be > 0"),
    ("dataset.batch_size=0", "dataset.batch_size must be > 0"),
    ("trainer.epochs=0", "trainer.epochs must be > 0"),
    ("quantizer.bits=1", "does not support 1 bits"),
    ("quantizer.step_guard=ignore", "step_guard"),
])
def test_bad_values_fail_before_training(tiny_run, tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        run(compose_config(tiny_run(override)))
