"""Hard stops: a run killed with SIGKILL resumes to exactly the uninterrupted result, and a crash
during a checkpoint write never costs the checkpoint already on disk."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nulsq.log import read_metrics
from nulsq.train import checkpoint as C
from nulsq.train import run

from conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# 64 images of 8x8, batch 8: 8 steps per epoch; one FP epoch, then two nuLSQ-A epochs.
COMMON = [
    "dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.batch_size=8",
    "dataset.image_size=8", "quantizer=nulsq_a", "pretrain.epochs=1", "trainer.epochs=2",
    "trainer.device=cpu", "trainer.log_interval=1", "init.batches=2", "trainer.seed=11",
]


def _kill_when(proc: subprocess.Popen, metrics: Path, ready, timeout: float = 240.0) -> None:
    """SIGKILL `proc` as soon as `ready(events)` holds for its metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it could be killed")
        if metrics.is_file() and ready(read_metrics(metrics)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the run never reached the point where it should be killed")


@pytest.mark.timeout(400)
def test_sigkill_mid_epoch_then_resume_auto_equals_the_uninterrupted_run(tmp_path):
    full_dir, cut_dir = tmp_path / "full", tmp_path / "cut"
    full = run(compose_config([*COMMON, f"trainer.output_dir={full_dir}"]))

    # The real CLI, killed once the FP epoch is done and a QAT step into the next epoch.
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}  # as this process
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "train.py", "logger=none", *COMMON, f"trainer.output_dir={cut_dir}"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        _kill_when(proc, cut_dir / "metrics.jsonl", lambda events: any(
            e["event"] == "epoch" and e["stage"] == "fp" for e in events) and sum(
            e["event"] == "step" and e["stage"] == "qat" for e in events) >= 1)
    assert proc.returncode == -signal.SIGKILL
    kept = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert kept["stage"] == "fp" or kept["state"]["epoch"] < 2  # it really died before the end
    assert not (cut_dir / "summary.json").exists()

    resumed = run(compose_config([*COMMON, "trainer.resume=auto", f"trainer.output_dir={cut_dir}"]))

    a = torch.load(full_dir / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(cut_dir / "checkpoints" / "last.pt", weights_only=False)
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for key in ("top1", "top5", "best_top1", "best_epoch", "fp_top1", "steps", "epochs", "status"):
        assert resumed[key] == full[key], key
    assert json.loads((cut_dir / "summary.json").read_text())["top1"] == full["top1"]

    # metrics.jsonl holds the killed epoch's events twice; the last epoch event is the same as
    # the uninterrupted run's, and plot_curves (the last record per stage and epoch wins) draws
    # the same curves.
    ev_full = read_metrics(full_dir / "metrics.jsonl")
    ev_cut = read_metrics(cut_dir / "metrics.jsonl")
    epoch_full = [e for e in ev_full if e["event"] == "epoch"]
    epoch_cut = [e for e in ev_cut if e["event"] == "epoch"]
    for key in ("val/top1", "val/top5", "val/loss", "train/loss", "train/top1", "epoch", "stage"):
        assert epoch_cut[-1][key] == epoch_full[-1][key], key
    assert sum(e["event"] == "init" for e in ev_cut) == 2  # the init ran again after the kill
    curves = _load_script("plot_curves").epoch_curves
    for key in ("val/top1", "train/loss"):
        assert curves(ev_cut, key) == curves(ev_full, key)


def test_a_stop_inside_the_fp_stage_resumes_there_before_any_qat(tmp_path):
    full = run(compose_config([*COMMON, f"trainer.output_dir={tmp_path / 'full'}"]))
    cut = [*COMMON, f"trainer.output_dir={tmp_path / 'cut'}"]
    stopped = run(compose_config([*cut, "trainer.max_steps=3"]))  # 3 of the FP epoch's 8 steps
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)
    assert stopped["status"] == "stopped" and ckpt["stage"] == "fp" and ckpt["state"]["step"] == 3
    assert not (tmp_path / "cut" / "checkpoints" / "fp.pt").exists()  # not a finished FP model
    resumed = run(compose_config([*cut, "trainer.resume=auto"]))
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "cut" / "checkpoints" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (resumed["top1"], resumed["fp_top1"]) == (full["top1"], full["fp_top1"])


def test_resume_auto_continues_the_newest_unfinished_sibling_of_the_same_config(tmp_path):
    # Hydra gives each start its own timestamped folder: auto looks at the siblings, skipping
    # finished runs and runs of another config (e.g. the one that hit NaN, rerun with a lower lr).
    from omegaconf import OmegaConf

    from nulsq.config import validate

    cfg = validate(compose_config(COMMON))
    other = validate(compose_config([*COMMON, "optim.weights.lr=0.001"]))
    for name, config, status in (("1_same", cfg, "failed"), ("2_finished", cfg, "finished"),
                                 ("3_other_lr", other, "failed")):
        run_dir = tmp_path / name
        C.atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(config, resolve=True))
        C.atomic_write_json(run_dir / "summary.json", {"status": status})
        C.atomic_torch_save(run_dir / "checkpoints" / "last.pt", {"v": torch.tensor(0)})
        time.sleep(0.01)  # distinct mtimes: 3_other_lr is the newest
    new_run = tmp_path / "4_new"
    assert C.find_resume("auto", new_run, C.config_fingerprint(cfg)) == (
        tmp_path / "1_same" / "checkpoints" / "last.pt")
    assert C.find_resume("auto", new_run) == tmp_path / "3_other_lr" / "checkpoints" / "last.pt"


# -- crashes during a checkpoint write --------------------------------------------------------


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def saved(tmp_path):
    """A checkpoint folder holding last.pt = {"v": 1}."""
    path = tmp_path / "checkpoints" / "last.pt"
    C.atomic_torch_save(path, {"v": torch.tensor(1)})
    return path


def _value(path: Path) -> int:
    return int(torch.load(path, weights_only=False)["v"])


def test_a_crash_inside_torch_save_leaves_the_old_checkpoint_and_no_temp_file(saved, monkeypatch):
    real_save = torch.save

    def half_written(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(10)  # what a full disk leaves: a torn file ...
        raise OSError(28, "No space left on device")  # ... and an error

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError):
        C.atomic_torch_save(saved, {"v": torch.tensor(2)})
    assert _value(saved) == 1
    assert _temps(saved.parent) == []


@pytest.mark.parametrize("failing", ["final rename", "rename of .prev"])
def test_a_crash_at_either_rename_leaves_a_loadable_last_pt(saved, monkeypatch, failing):
    C.atomic_torch_save(saved, {"v": torch.tensor(2)})  # last.pt = 2, last.pt.prev = 1
    real_replace = os.replace
    target = saved if failing == "final rename" else saved.with_name("last.pt.prev")

    def replace(src, dst):
        if Path(dst) == target:
            raise KeyboardInterrupt  # the nearest thing to a kill that still runs cleanup
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        C.atomic_torch_save(saved, {"v": torch.tensor(3)})
    assert _value(saved) == 2  # never missing, never the torn new one
    assert _temps(saved.parent) == []
    monkeypatch.setattr(os, "replace", real_replace)
    # resume=auto still finds it
    assert C.find_resume("auto", saved.parent.parent) == saved


def test_keeps_the_previous_checkpoint_and_clears_temps_of_a_killed_writer(saved):
    stale = saved.parent / ".last.pt.k1ll3d.tmp"  # what SIGKILL during a write leaves behind
    stale.write_bytes(b"partial")
    C.atomic_torch_save(saved, {"v": torch.tensor(2)})
    assert _value(saved) == 2 and _value(saved.with_name("last.pt.prev")) == 1
    assert _temps(saved.parent) == []
    C.atomic_torch_save(saved, {"v": torch.tensor(3)})
    assert _value(saved) == 3 and _value(saved.with_name("last.pt.prev")) == 2


def test_run_files_are_readable_by_others_like_any_file_the_user_writes(saved):
    umask = os.umask(0o022)
    os.umask(umask)
    assert saved.stat().st_mode & 0o777 == 0o666 & ~umask
