"""Run logging: metrics.jsonl, the W&B mirror (read back with W&B's own record reader), snapshots."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.log import build_logger, quantizer_snapshot, read_metrics
from nulsq.log import wandb_run as wandb_run_module
from nulsq.log.logger import history_to_replay
from nulsq.log.wandb_run import has_api_key, resolve_mode
from nulsq.quant.base import Quantizer

REPO = Path(__file__).resolve().parents[1]
DISABLED = {"wandb": {"mode": "disabled"}}


class StepQ(Quantizer):
    """A tiny hand-written quantizer: unsigned, learnable steps, levels at their running sums."""

    kind = "test_steps"

    def __init__(self, steps: list[float], role: str = "act") -> None:
        super().__init__(bits=2, signed=False, role=role)
        self.steps = nn.Parameter(torch.tensor(steps))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def step_sizes(self) -> torch.Tensor:
        return self.steps

    def levels(self) -> torch.Tensor:
        return torch.cat([torch.zeros(1), torch.cumsum(self.steps, 0)])


class FixedQ(Quantizer):
    """No learnable steps (like a dynamic max quantizer): steps None, fixed levels."""

    kind = "test_fixed"

    def __init__(self) -> None:
        super().__init__(bits=2, signed=True, role="weight")

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def levels(self) -> torch.Tensor:
        return torch.tensor([-1.0, -0.5, 0.0, 0.5], dtype=torch.float64)


def tiny_model() -> nn.Module:
    body = nn.Sequential(nn.Linear(3, 3), StepQ([0.25, 0.5, 1.0]))
    body.add_module("wq", FixedQ())
    wrapper = nn.Module()
    wrapper.module = body  # the attribute name DDP uses: "module." must not reach the layer names
    return wrapper


# -- metrics.jsonl ---------------------------------------------------------------------------------
def test_jsonl_round_trip_torn_line_and_resume(tmp_path: Path) -> None:
    start = time.time()
    logger = build_logger(DISABLED, tmp_path, {}, {})
    assert logger.wandb_id is None
    logger.log("step", {"loss": torch.tensor(1.5), "lr/weights": np.float32(0.25), "epoch": 0.5}, step=3)
    # Line-buffered: the event is on disk before anything is closed.
    on_disk = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(on_disk) == 1 and json.loads(on_disk[0])["loss"] == 1.5
    logger.log("epoch", {"epoch": 1, "stage": "qat", "val/top1": 12.5}, step=4)
    logger.finish({"best_top1": 12.5})

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in records] == ["step", "epoch", "summary"]
    assert records[0] | {"time": 0} == {"event": "step", "step": 3, "time": 0, "loss": 1.5,
                                         "lr/weights": 0.25, "epoch": 0.5}
    assert records[1]["stage"] == "qat" and records[1]["val/top1"] == 12.5
    assert records[2]["best_top1"] == 12.5 and records[2]["step"] == 4
    assert all(start - 1 <= r["time"] <= time.time() + 1 for r in records)

    # A kill mid-write leaves a torn last line: readers skip it ...
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "step", "st')
    assert read_metrics(tmp_path / "metrics.jsonl") == records
    # ... and a resumed run cuts it off before appending, so every line stays valid JSON.
    resumed = build_logger(DISABLED, tmp_path, {}, {})
    resumed.log("step", {"loss": 0.75}, step=5)
    resumed.finish({})
    again = read_metrics(tmp_path / "metrics.jsonl")
    assert again[:3] == records and again[3]["loss"] == 0.75 and len(again) == 5


def test_corrupt_middle_line_and_missing_file_are_user_errors(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "step"}\nnot json\n{"event": "epoch"}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2"):
        read_metrics(path)
    with pytest.raises(UserError, match="no metrics file"):
        read_metrics(tmp_path / "absent.jsonl")


def test_other_ranks_get_a_no_op_logger(tmp_path: Path) -> None:
    logger = build_logger({"wandb": {"mode": "offline"}}, tmp_path, {}, {}, rank=1)
    logger.log("step", {"loss": 1.0}, step=1)
    logger.finish({})
    assert logger.wandb_id is None and not any(tmp_path.iterdir())


def test_disabled_mode_never_imports_wandb(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from nulsq.log import build_logger\n"
        f"lg = build_logger({{'wandb': {{'mode': 'disabled'}}}}, Path({str(tmp_path)!r}), {{}}, {{}})\n"
        "lg.log('step', {'loss': 1.0}, step=1); lg.finish({})\n"
        "assert 'wandb' not in sys.modules, 'wandb was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 1.0


# -- choosing the W&B mode -------------------------------------------------------------------------
@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    # never the network: the W&B host "answers" unless a test says otherwise
    monkeypatch.setattr(wandb_run_module, "host_reachable", lambda timeout=3.0: True)
    return tmp_path


def test_mode_resolution(no_credentials: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    assert not has_api_key()
    assert resolve_mode(None) == "offline"
    with caplog.at_level(logging.WARNING, logger="nulsq.log.wandb_run"):
        assert resolve_mode("online") == "offline"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "offline" in warnings[0] and "\n" not in warnings[0]
    assert resolve_mode("disabled") == "disabled" and resolve_mode("offline") == "offline"
    with pytest.raises(UserError, match="valid: online, offline, disabled"):
        resolve_mode("onlin")
    with pytest.raises(UserError, match="logger.wandb.projet"):
        build_logger({"wandb": {"mode": "disabled", "projet": "x"}}, no_credentials, {}, {})

    netrc = no_credentials / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    assert has_api_key() and resolve_mode(None) == "online" and resolve_mode("online") == "online"
    netrc.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert resolve_mode(None) == "online"


def test_wandb_mode_environment_and_a_node_without_internet(no_credentials, monkeypatch, caplog) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    # WANDB_MODE decides when logger.wandb.mode is null; an explicit mode still wins
    for env, expected in [("offline", "offline"), ("disabled", "disabled"), ("dryrun", "offline"),
                          ("online", "online"), ("run", "online"), ("Offline", "offline")]:
        monkeypatch.setenv("WANDB_MODE", env)
        assert resolve_mode(None) == expected, env
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("offline") == "offline" and resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "ofline")
    with pytest.raises(UserError, match="unknown WANDB_MODE 'ofline'; valid: online, offline, disabled"):
        resolve_mode(None)
    monkeypatch.delenv("WANDB_MODE")
    # a stored key on a node that cannot reach W&B: offline, said in one warning line
    monkeypatch.setattr(wandb_run_module, "host_reachable", lambda timeout=3.0: False)
    with caplog.at_level(logging.WARNING, logger="nulsq.log.wandb_run"):
        assert resolve_mode(None) == "offline"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "api.wandb.ai cannot be reached" in warning and "logging offline" in warning
    assert resolve_mode("online") == "online"  # explicit online: no probe (proxies)
    # the probe itself: a closed local port does not answer
    monkeypatch.undo()
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    assert wandb_run_module.host_reachable(timeout=1.0) is False


def test_history_to_replay_keeps_what_the_checkpoint_holds() -> None:
    def ev(event, step, **data):
        return {"event": event, "step": step, "time": 0.0, **data}

    records = [
        ev("step", 1, loss=3.0), ev("step", 2, loss=2.0), ev("epoch", 2, epoch=1),
        ev("quantizers", 2, epoch=1), ev("step", 3, loss=9.0), ev("step", 4, loss=9.5),  # killed
        ev("step", 3, loss=1.5), ev("step", 4, loss=1.0), ev("epoch", 4, epoch=2),  # resumed
        ev("quantizers", 4, epoch=2), ev("summary", 4), ev("step", 5, loss=0.5),  # stopped, then lost
    ]
    kept = history_to_replay(records)
    assert [(r["event"], r["step"], r.get("loss")) for r in kept] == [
        ("step", 1, 3.0), ("step", 2, 2.0), ("epoch", 2, None), ("quantizers", 2, None),
        ("step", 3, 1.5), ("step", 4, 1.0), ("epoch", 4, None), ("quantizers", 4, None)]
    assert history_to_replay(records[:2]) == []  # no epoch finished: nothing was checkpointed


def test_wandb_init_failure_degrades_to_jsonl(tmp_path: Path, monkeypatch, caplog) -> None:
    import wandb

    def broken_init(**kwargs):
        raise RuntimeError("service unreachable\nsecond line")

    monkeypatch.setattr(wandb, "init", broken_init)
    with caplog.at_level(logging.WARNING, logger="nulsq.log.wandb_run"):
        logger = build_logger({"wandb": {"mode": "offline"}}, tmp_path, {}, {})
    assert logger.wandb_id is None
    assert any("service unreachable" in r.getMessage() and "\n" not in r.getMessage()
               for r in caplog.records)
    logger.log("step", {"loss": 2.0}, step=1)
    logger.finish({})
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.0


# -- quantizer snapshots ---------------------------------------------------------------------------
def test_quantizer_snapshot_lists_every_quantizer() -> None:
    snap = quantizer_snapshot(tiny_model())
    assert snap == {"layers": {
        "1": {"kind": "test_steps", "role": "act", "bits": 2, "signed": False,
              "steps": [0.25, 0.5, 1.0], "levels": [0.0, 0.25, 0.75, 1.75]},
        "wq": {"kind": "test_fixed", "role": "weight", "bits": 2, "signed": True,
               "steps": None, "levels": [-1.0, -0.5, 0.0, 0.5]},
    }}
    json.dumps(snap)  # plain Python: goes to metrics.jsonl as is


# -- an offline W&B run, read back with W&B's own transaction-log reader ---------------------------
def wandb_records(wandb_file: Path, *extra: str) -> str:
    """`wandb leet inspect --json`: W&B's reader of the .wandb record log (this wandb version has
    no Python datastore module; the reader ships in its wandb-core binary)."""
    result = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *extra,
                             str(wandb_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def wandb_dirs(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))


def test_offline_wandb_run_is_readable(tmp_path: Path, wandb_dirs, caplog) -> None:
    meta = {"experiment": "table5_resnet18_2bit", "table": "5", "model": "resnet18",
            "method": "nulsq_a", "bits": 2, "seed": 0}
    run_dir = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="nulsq")
    logger = build_logger({"wandb": {"mode": "offline", "project": "nulsq-test"}}, run_dir,
                          {"quantizer": {"name": "nulsq_a", "bits": 2}, "dataset": {"val_split": 0.1}},
                          meta, resume_id="abcd1234")
    assert logger.wandb_id == "abcd1234"
    # the console handler train.py's logging set-up gives (configs/hydra/job_logging/nulsq.yaml)
    console = logging.StreamHandler(sys.stdout)
    logging.getLogger("nulsq").addHandler(console)
    try:
        logging.getLogger("nulsq.train.progress").info("[qat] epoch 1/1 step 1/2 loss 2.5000")
    finally:
        logging.getLogger("nulsq").removeHandler(console)
    logger.log("init", {"method": "mse", "batches": 2, **quantizer_snapshot(tiny_model())}, step=0)
    logger.log("step", {"loss": 2.5, "lr/weights": 0.1, "lr/quant": 0.001, "epoch": 0.5}, step=1)
    logger.log("step", {"loss": 2.0, "lr/weights": 0.05, "lr/quant": 0.0005, "epoch": 1.0,
                        "images_per_s": 900.0}, step=2)
    logger.log("epoch", {"epoch": 1, "stage": "qat", "train/loss": 2.2, "val/top1": 31.5}, step=2)
    logger.log("quantizers", {"epoch": 1, **quantizer_snapshot(tiny_model())}, step=2)
    logger.log("step", {"loss": 9.0}, step=1)  # W&B rows never go back: JSONL only
    logger.finish({"best_top1": 31.5, "top1": 30.0, "images_per_s": 1000.0})
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 7  # JSONL keeps everything
    # the console line went to train.log (and, captured from stdout, to W&B: below)
    assert "[qat] epoch 1/1 step 1/2 loss 2.5000" in (run_dir / "train.log").read_text()

    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-abcd1234.wandb"))
    assert len(wandb_files) == 1
    sync = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(sync) == 1 and sync[0].endswith(f"wandb sync {wandb_files[0].parent}")

    records = [json.loads(line) for line in wandb_records(wandb_files[0]).splitlines()]
    run = next(r["run"] for r in records if r["type"] == "run")
    assert run["run_id"] == "abcd1234" and run["project"] == "nulsq-test"
    assert run["run_group"] == "table5_resnet18_2bit" and run["display_name"] == "resnet18-nulsq_a-2-0"
    assert set(run["tags"]) == {"table:5", "model:resnet18", "method:nulsq_a", "bits:2", "seed:0"}
    assert run["job_type"] == "search"  # dataset.val_split > 0
    assert run["config"]["update"]["quantizer"] == {"name": "nulsq_a", "bits": 2}

    history = {r["history"]["step"].get("num", 0): r["history"]["item"]
               for r in records if r["type"] == "history"}
    assert history[0]["init/method"] == "mse" and history[0]["init/batches"] == 2
    assert "init/layers/1/kind" not in history[0] and history[0]["init/steps_table._type"] == "table-file"
    assert history[0]["init/steps_table.nrows"] == 3
    assert history[0]["quantizers/1/levels._type"] == "histogram"
    assert history[1]["loss"] == 2.5 and history[1]["lr/quant"] == 0.001
    assert sum("steps must not decrease" in r.getMessage() for r in caplog.records) == 1
    last = history[2]  # step, epoch and quantizer events of step 2 share one W&B row
    assert last["loss"] == 2.0 and last["epoch"] == 1
    # Epoch metrics carry their stage (epochs restart per stage), and are plotted against "epoch".
    assert last["qat/val/top1"] == 31.5 and last["qat/train/loss"] == 2.2 and "val/top1" not in last
    # levels: one histogram per quantizer and epoch, no key per level, no table per epoch
    assert not [k for r in history.values() for k in r if k.startswith("levels/")]
    assert not [k for k in last if "table" in k]
    assert last["quantizers/1/steps._type"] == "histogram"
    assert last["quantizers/1/levels._type"] == "histogram" and sum(last["quantizers/1/levels.values"]) == 4
    assert sum(last["quantizers/1/steps.values"]) == 3 and sum(last["quantizers/wq/levels.values"]) == 4
    assert "quantizers/wq/steps._type" not in last  # no learnable steps, no histogram

    metrics = {m["metric"]["name"]: m["metric"] for m in records if m["type"] == "metric"}
    assert metrics["qat/val/top1"]["step_metric"] == "epoch"
    assert metrics["qat/train/loss"]["step_metric"] == "epoch" and "loss" not in metrics

    summary = json.loads(wandb_records(wandb_files[0], "--summary"))
    assert summary["summary"]["best_top1"] == 31.5 and summary["state"] == "finished"
    # run-level values: the run's mean images/s, not the last step's 900 committed at finish
    assert summary["summary"]["images_per_s"] == 1000.0 and summary["summary"]["top1"] == 30.0
    # console capture: tests/test_log.py::test_console_lines_reach_wandb (a process of its own)


def test_resumed_offline_run_holds_the_whole_history(tmp_path: Path, wandb_dirs, caplog) -> None:
    run_dir, cfg = tmp_path / "run", {"wandb": {"mode": "offline", "project": "nulsq-test"}}
    meta = {"experiment": "e", "model": "m", "method": "lsq", "bits": 2, "seed": 0}
    first = build_logger(cfg, run_dir, {}, meta)
    run_id = first.wandb_id
    first.log("step", {"loss": 3.0}, step=1)
    first.log("step", {"loss": 2.0}, step=2)
    first.log("epoch", {"epoch": 1, "stage": "qat", "val/top1": 20.0}, step=2)  # checkpointed here
    first.log("step", {"loss": 9.0}, step=3)  # lost: the run stops before its next checkpoint
    first.finish({"status": "stopped"})
    time.sleep(1.1)  # W&B names offline folders by the second: the resume's must be another one

    caplog.set_level(logging.INFO, logger="nulsq")
    resumed = build_logger(cfg, run_dir, {}, meta, resume_id=run_id)
    resumed.log("step", {"loss": 1.5}, step=3)
    resumed.log("step", {"loss": 1.0}, step=4)
    resumed.log("epoch", {"epoch": 2, "stage": "qat", "val/top1": 30.0}, step=4)
    resumed.finish({"status": "finished", "top1": 30.0})

    folders = sorted(run_dir.glob(f"wandb/offline-run-*-{run_id}"), key=lambda p: p.stat().st_mtime)
    assert len(folders) == 2  # one per attempt; the newest holds everything
    sync = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert sync[-1] == (f"W&B offline run saved (the whole history, resumes included); upload it "
                        f"with: wandb sync {folders[-1]}")
    records = [json.loads(line) for line in wandb_records(folders[-1]).splitlines()]
    history = {r["history"]["step"].get("num", 0): r["history"]["item"]
               for r in records if r["type"] == "history"}
    assert sorted(history) == [1, 2, 3, 4]
    assert [history[s]["loss"] for s in (1, 2, 3, 4)] == [3.0, 2.0, 1.5, 1.0]  # not the lost 9.0
    assert history[2]["qat/val/top1"] == 20.0 and history[4]["qat/val/top1"] == 30.0
    assert sum("steps must not decrease" in r.getMessage() for r in caplog.records) == 0


CONSOLE_SCRIPT = """
import logging, sys
from pathlib import Path
from nulsq.log import build_logger
logger = build_logger({"wandb": {"mode": "offline", "project": "nulsq-test"}}, Path(sys.argv[1]), {}, {},
                      resume_id="abcd1234")
logging.getLogger("nulsq").setLevel(logging.INFO)
console = logging.StreamHandler(sys.stdout)  # the console handler train.py's logging set-up gives
logging.getLogger("nulsq").addHandler(console)
logging.getLogger("nulsq.train.progress").info("[qat] epoch 1/1 step 1/2 loss 2.5000")
logger.finish({})
"""


def test_console_lines_reach_wandb(tmp_path: Path, wandb_dirs) -> None:
    # In a process of its own: W&B captures the console of its process, and what earlier tests of
    # a long pytest process did to sys.stdout (capture fixtures, wrapped streams) is not a user's.
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "WANDB_MODE": "offline"}
    subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, str(run_dir)], check=True, env=env,
                   capture_output=True, text=True, timeout=120)
    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-abcd1234.wandb")
    summary = json.loads(wandb_records(wandb_file, "--summary"))
    assert any("[qat] epoch 1/1 step 1/2 loss 2.5000" in c["line"] for c in summary["console"])
