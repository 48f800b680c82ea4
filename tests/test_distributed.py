"""DDP: a 2-process gloo job on CPU trains like 1 process with the same global batch, and resumes
exactly after mid-epoch stops.

The comparison model has no BatchNorm: with BN, each rank normalises with the statistics of its
own half batch, which is not what one process does with the whole batch, and torch's
SyncBatchNorm (trainer.sync_bn, which would make them equal) runs on CUDA only. Quantizers are
batch-independent here too: the first and last layers use the configured nuLSQ-A quantizers
(`quantizer.first_last=same`) rather than the 8-bit max-based ones, whose step is the max of the
current (per-rank) batch. The step-size init itself is checked to be rank-independent: every
rank observes the gathered global batches.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir
from torch import nn

from nulsq.cli import rank_overrides
from nulsq.errors import UserError
from nulsq.models.registry import MODELS, SOURCES, ModelSpec
from nulsq.train import distributed as D
from nulsq.train import run

from conftest import CONFIG_DIR, ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = "tiny_plain_cnn"  # registered by this test only


def _plain_cnn(arch: str, num_classes: int, kwargs: dict) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )


def _register_tiny_model() -> None:
    if TINY in MODELS:
        return
    SOURCES.register("test_plain")(_plain_cnn)
    MODELS.register(TINY)(ModelSpec(name=TINY, source="test_plain", arch="plain", input_size=8,
                                    family="resnet", min_input_size=1))


def _overrides(out: Path) -> list[str]:
    # 64 images, global batch 16: 4 steps per epoch; 1 FP epoch, then 2 nuLSQ-A epochs.
    return [
        "dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.batch_size=16",
        "dataset.image_size=8", f"model.name={TINY}", "model.pretrained=false",
        "quantizer=nulsq_a", "quantizer.first_last=same", "init.batches=3",
        "pretrain.epochs=1", "trainer.epochs=2", "trainer.device=cpu", "trainer.log_interval=2",
        # a constant, large lr: the weights must move well beyond the tolerance of the comparison
        "schedule=constant", "optim.weights.lr=0.3", "optim.quant.lr=0.002",
        "trainer.seed=5", f"trainer.output_dir={out}",
    ]


def _save_state_after_init(out: Path, tag: str) -> None:
    """Wrap the trainer's step-size init so each process dumps its model right after it."""
    run_module = importlib.import_module("nulsq.train.run")  # the module, not the function
    original = run_module._init_steps

    def spy(cfg, model, bundle, dist, log, step):
        original(cfg, model, bundle, dist, log, step)
        path = out / f"init_{tag}_rank{dist.rank}.pt"
        if not path.exists():  # the first run's
            torch.save(model.state_dict(), path)

    run_module._init_steps = spy


# Stops by max_steps (counted per stage): inside the FP epoch, then inside the 2nd QAT epoch.
STOPS = (["trainer.max_steps=3"], ["trainer.max_steps=6", "trainer.resume=auto"],
         ["trainer.resume=auto"])


def _worker(rank: int, world_size: int, ports: list[int], out: str) -> None:
    """One torchrun-like process: the environment torchrun would set, then the real trainer,
    for a whole run and then for the same run stopped twice and resumed (one port per job)."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "MASTER_ADDR": "127.0.0.1"})
    torch.set_num_threads(1)  # two processes share the test machine's cores
    _register_tiny_model()
    _save_state_after_init(Path(out), "ddp")
    jobs = [(Path(out) / "run", [])] + [(Path(out) / "cut", stop) for stop in STOPS]
    for port, (run_dir, extra) in zip(ports, jobs):
        os.environ["MASTER_PORT"] = str(port)
        run(compose_config(_overrides(run_dir) + extra))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def tiny_model():
    """The tiny model registered for this test only, so other tests see the real registry."""
    _register_tiny_model()
    yield
    MODELS.unregister(TINY)
    SOURCES.unregister("test_plain")


@pytest.mark.timeout(240)
def test_two_process_gloo_run_matches_one_process_with_the_same_global_batch(tmp_path, monkeypatch,
                                                                             tiny_model):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    # 1 process, in this one (the spy is undone by monkeypatch afterwards).
    run_module = importlib.import_module("nulsq.train.run")
    monkeypatch.setattr(run_module, "_init_steps", run_module._init_steps)
    _save_state_after_init(one, "single")
    single = run(compose_config(_overrides(one / "run")))
    # 2 processes, as torchrun --nproc_per_node=2 would start them.
    mp.spawn(_worker, args=(2, [_free_port() for _ in range(4)], str(two)), nprocs=2, join=True)

    # Step-size init gave every rank the same network, and the one a single process gets.
    init0 = torch.load(two / "init_ddp_rank0.pt")
    init1 = torch.load(two / "init_ddp_rank1.pt")
    init_single = torch.load(one / "init_single_rank0.pt")
    for key in init_single:
        assert torch.equal(init0[key], init1[key]), key
        torch.testing.assert_close(init0[key], init_single[key], rtol=0, atol=1e-6, msg=key)

    # After 12 optimizer steps, weights and step sizes agree (the reduction order differs).
    a = torch.load(one / "run" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(two / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 8 and b["stage"] == "qat"
    steps = [k for k in a["model"] if "quant" in k]
    assert len(steps) >= 8  # nuLSQ and LSQ steps of every layer are compared below
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=0, atol=1e-5, msg=key)
    # The weights moved, so the agreement is not that of two untouched copies.
    assert not torch.allclose(a["model"]["2.weight"], init_single["2.weight"], atol=1e-3)

    # Only rank 0 wrote: the same events as one process, once each; summaries agree.
    ev_a, ev_b = _events(one / "run"), _events(two / "run")
    assert [e["event"] for e in ev_a] == [e["event"] for e in ev_b]
    summary = json.loads((two / "run" / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert summary["top1"] == pytest.approx(single["top1"])
    assert summary["fp_top1"] == pytest.approx(single["fp_top1"])
    val_a = [e["val/loss"] for e in ev_a if e["event"] == "epoch"]
    val_b = [e["val/loss"] for e in ev_b if e["event"] == "epoch"]
    assert val_b == pytest.approx(val_a, abs=1e-4)
    # Every rank's RNG state is in the checkpoint, for an exact resume.
    assert isinstance(b["rng"], list) and len(b["rng"]) == 2

    # The 2-process run stopped mid-epoch twice and resumed ends bit-identical to its whole run,
    # the resumed epochs' train metrics included (rank 0 keeps every rank's partial sums).
    c = torch.load(two / "cut" / "checkpoints" / "last.pt", weights_only=False)
    for key in b["model"]:
        assert torch.equal(c["model"][key], b["model"][key]), key
    last_b = [e for e in ev_b if e["event"] == "epoch"][-1]
    last_c = [e for e in _events(two / "cut") if e["event"] == "epoch"][-1]
    for key in ("train/loss", "train/top1", "val/loss", "val/top1", "epoch", "stage"):
        assert last_c[key] == last_b[key], key


def test_sync_bn_on_cpu_is_refused_with_the_flag_named():
    with pytest.raises(UserError, match="trainer.sync_bn=true needs CUDA"):
        D.check_sync_bn(True, "cpu", D.DistInfo(rank=0, world_size=2))
    D.check_sync_bn(True, "cpu", D.DistInfo())  # one process: no DDP, nothing to sync
    D.check_sync_bn(True, "cuda", D.DistInfo(rank=0, world_size=2))


def test_ranks_above_zero_send_hydra_output_to_a_scratch_folder():
    argv = ["train.py", "hydra.run.dir=runs/x", "model=preresnet20", "trainer.epochs=3"]
    assert rank_overrides(argv, {}) == argv
    assert rank_overrides(argv, {"RANK": "0", "WORLD_SIZE": "2"}) == argv
    moved = rank_overrides(argv, {"RANK": "1", "WORLD_SIZE": "2"})
    assert "hydra.run.dir=runs/x" not in moved and moved[:3] == [argv[0], *argv[2:]]
    scratch = next(a.split("=", 1)[1] for a in moved if a.startswith("hydra.run.dir="))
    assert Path(scratch).is_dir() and "nulsq-rank1-" in scratch
    assert "hydra.output_subdir=null" in moved
    # Hydra accepts the result, and rank 1's Hydra then writes nothing of its own.
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", overrides=moved[1:], return_hydra_config=True)
    assert cfg.hydra.run.dir == scratch and cfg.hydra.output_subdir is None
    assert cfg.trainer.epochs == 3


SLURM_ENV = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "8",
             "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[3-4]",
             "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


def test_a_multi_task_submitit_slurm_job_becomes_a_torchrun_environment(monkeypatch):
    # submitit comes with the slurm extra; a job it launched always has it.
    pytest.importorskip("submitit")
    monkeypatch.setattr(os, "environ", dict(SLURM_ENV))
    D._export_submitit_env()
    assert {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu3"}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_a_plain_run_inside_an_sbatch_script_stays_one_process(monkeypatch):
    """Whatever SLURM_NTASKS says, without submitit's launch marker (needs no submitit)."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in SLURM_ENV.items() if k != "SUBMITIT_EXECUTOR"})
    D._export_submitit_env()
    assert "WORLD_SIZE" not in os.environ and D.init_distributed("cpu") == D.DistInfo()


def test_the_submitit_slurm_launcher_submits_one_task_per_gpu(tmp_path):
    """`-m hydra/launcher=submitit_slurm` through the real CLI, on a fake cluster: srun exists,
    and sbatch keeps the job script it is given, then refuses it."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir, script = tmp_path / "bin", tmp_path / "job.sh"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {script}\necho "fake cluster" >&2\nexit 1\n')
    for tool in ("srun", "sbatch"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        [sys.executable, "train.py", "-m", "hydra/launcher=submitit_slurm",
         "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=gpu",
         f"hydra.sweep.dir={tmp_path / 'sweep'}", "trainer.seed=0,1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert "fake cluster" in proc.stderr, proc.stderr[-2000:]
    sbatch = script.read_text()
    for line in ("--gpus-per-node=4", "--ntasks-per-node=4", "--nodes=1", "--partition=gpu",
                 "--time=1440", "--array=0-1"):  # tasks follow GPUs; the two seeds, one array
        assert f"#SBATCH {line}" in sbatch, line
    assert "export SUBMITIT_EXECUTOR=slurm" in sbatch and "srun" in sbatch  # what distributed.py reads
    assert "UserWarning" not in proc.stderr  # the schema-matching warning is silenced
