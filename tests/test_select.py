"""scripts/select.py: a sweep's settings ranked by mean held-out top-1, the winner written as an
hparams file whose jobs are the final runs. The fabricated sweep's winner is known by construction."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from nulsq.config import validate
from nulsq.errors import UserError

from conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = "table5_resnet18_2bit"


def load_select():
    spec = importlib.util.spec_from_file_location("script_select", ROOT / "scripts" / "select.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def search_job(sweep: Path, num: int, *, lr: float, seed: int, top1: float | None,
               status: str = "finished", val_split: float = 0.1, epochs: int = 15) -> Path:
    """A job folder as a grid multirun leaves it: resolved config, summary, Hydra's overrides."""
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    cfg = {"experiment": EXPERIMENT, "table": "5", "model": {"name": "resnet18"},
           "dataset": {"name": "imagenet", "root": "/data/imagenet", "val_split": val_split},
           "quantizer": {"name": "nulsq_a", "bits": 2},
           "optim": {"quant": {"name": "adamw", "lr": lr, "weight_decay": 0.0}},
           "trainer": {"seed": seed, "epochs": epochs, "output_dir": None}}
    (job / "config.yaml").write_text(yaml.safe_dump(cfg))
    (job / "summary.json").write_text(json.dumps({"status": status, "top1": top1}))
    overrides = [f"+experiment={EXPERIMENT}", "hparams=table5_grid", "dataset.root=/data/imagenet",
                 f"optim.quant.lr={lr}", "dataset.val_split=0.1", f"trainer.epochs={epochs}",
                 "schedule.warmup_epochs=0.5", f"trainer.seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun" / EXPERIMENT / "t"
    # lr 4e-4: mean of 60, 62 = 61 (the winner); lr 4e-3: 59.5; lr 4e-5: one failed seed, not eligible
    jobs = [(4e-3, 0, 59.0), (4e-3, 1, 60.0), (4e-4, 0, 60.0), (4e-4, 1, 62.0), (4e-5, 0, 70.0)]
    for num, (lr, seed, top1) in enumerate(jobs):
        search_job(root, num, lr=lr, seed=seed, top1=top1)
    search_job(root, 5, lr=4e-5, seed=1, top1=None, status="failed")
    search_job(root, 6, lr=4e-4, seed=2, top1=1.0, status="stopped")  # unfinished: skipped
    search_job(root, 7, lr=4e-3, seed=2, top1=99.0, val_split=0.0)  # evaluation set: never used
    return root


def test_known_winner_table_and_hparams_file(sweep, tmp_path, capsys):
    hparams = tmp_path / "hparams"
    assert load_select().main([str(sweep), "--hparams-dir", str(hparams), "--seeds", "0", "1", "2"]) == 0
    printed = capsys.readouterr().out
    name = f"selected/{EXPERIMENT}_nulsq_a"
    assert f"{name}: optim.quant.lr=0.0004: held-out top-1 61.00 over 2 seeds" in printed
    assert (f"final runs: python train.py +experiment={EXPERIMENT} dataset.root=/data/imagenet "
            f"hparams={name}") in printed
    assert "1 scored on the evaluation set (dataset.val_split = 0), 1 status stopped" in printed

    table = (sweep / "selection.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "rank" not in line]
    assert [r.split(" | ")[:3] for r in rows] == [
        ["| 1", "0.0004", "61.00 ± 1.41"], ["| 2", "0.004", "59.50 ± 0.71"], ["| -", "4e-05", "70.00"]]
    assert rows[2].split(" | ")[5] == "1"  # the failed seed
    assert (f"python train.py +experiment={EXPERIMENT} dataset.root=/data/imagenet "
            f"optim.quant.lr=0.0004 hparams=seeds") in table

    # The hparams file's jobs are the final runs: the winner's lr, the full training set, the
    # experiment's own length, one job per seed.
    data = yaml.safe_load((hparams / f"{name}.yaml").read_text())
    assert data["hydra"]["mode"] == "MULTIRUN"
    params = [f"{k}={v}" for k, v in data["hydra"]["sweeper"]["params"].items()]
    (jobs,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)
    assert len(jobs) == 3
    for seed, job in enumerate(jobs):
        cfg = validate(compose_config([f"+experiment={EXPERIMENT}", *job]))
        assert cfg.optim.quant.lr == 4e-4 and cfg.trainer.seed == seed
        assert cfg.dataset.val_split == 0.0 and cfg.trainer.epochs == 90


def test_refuses_to_select_on_the_evaluation_set(tmp_path):
    for num, seed in enumerate([0, 1]):
        search_job(tmp_path / "final", num, lr=4e-4, seed=seed, top1=70.0, val_split=0.0)
    with pytest.raises(UserError, match="refusing to select on the evaluation set: the 2 runs"):
        load_select().write_selection(tmp_path / "final", tmp_path / "hp", [0], None)
    assert not (tmp_path / "hp").exists() and not (tmp_path / "final" / "selection.md").exists()
    with pytest.raises(UserError, match="no run directories"):
        load_select().write_selection(tmp_path / "empty", tmp_path / "hp", [0], None)


def test_a_searched_run_length_does_not_reach_the_final_runs(tmp_path, capsys):
    # lr x epochs: the best is lr 4e-4 at 30 epochs; the final runs take the lr, not the length
    for num, (lr, epochs, top1) in enumerate([(4e-3, 15, 50.0), (4e-4, 15, 55.0), (4e-4, 30, 58.0)]):
        search_job(tmp_path / "sweep", num, lr=lr, seed=0, top1=top1, epochs=epochs)
    load_select().main([str(tmp_path / "sweep"), "--hparams-dir", str(tmp_path / "hp")])
    table = (tmp_path / "sweep" / "selection.md").read_text()
    assert "| rank | optim.quant.lr | trainer.epochs | top-1 |" in table
    params = yaml.safe_load((tmp_path / "hp" / "selected" / f"{EXPERIMENT}_nulsq_a.yaml").read_text())
    assert params["hydra"]["sweeper"]["params"] == {"optim.quant.lr": 0.0004, "trainer.seed": "0,1,2,3,4"}
    assert "trainer.epochs" not in capsys.readouterr().out


@pytest.mark.slow
def test_real_sweep_then_select_through_the_cli(tmp_path):
    # Two settings of the weights' lr on a held-out quarter of synthetic data, one seed each.
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    args = ["logger=none", "dataset=synthetic", "dataset.num_train=48", "dataset.num_val=16",
            "dataset.batch_size=16", "dataset.image_size=16", "trainer.device=cpu", "trainer.epochs=1",
            "init.batches=1", "pretrain.epochs=0", "dataset.val_split=0.25", "optim.weights.lr=0.05,0.2",
            f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run([sys.executable, "train.py", "-m", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "scripts/select.py", str(sweep), "--hparams-dir",
                           str(tmp_path / "hp")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    scores = {}
    for job in ("0", "1"):
        lr = yaml.safe_load((sweep / job / "config.yaml").read_text())["optim"]["weights"]["lr"]
        scores[lr] = json.loads((sweep / job / "summary.json").read_text())["top1"]
    best = max(scores.values())
    written = yaml.safe_load((tmp_path / "hp" / "selected" / "default_nulsq_a.yaml").read_text())
    params = written["hydra"]["sweeper"]["params"]
    assert scores[params["optim.weights.lr"]] == best and params["trainer.seed"] == "0,1,2,3,4"
    assert "final runs: python train.py logger=none dataset=synthetic" in proc.stdout
    assert "trainer.epochs" not in proc.stdout and "val_split" not in proc.stdout
