"""Every bad input stops the run with one line saying what is wrong and what to do, and leaves
nothing a later resume or make_tables would take for a result.

What a failed start may leave (decided here): config.yaml (nothing reads it as a result),
metrics.jsonl, and summary.json with status "failed"; never a summary.json with status
"finished", and never a checkpoint that was not the state of a good, finished epoch.
Most cases run `nulsq.train.run` in this process; a few go through the real CLI.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from nulsq.cli import check_group_choices
from nulsq.errors import UserError
from nulsq.log.wandb_run import WandbRun
from nulsq.quant.convert import quantizers
from nulsq.results import load_runs
from nulsq.train import checkpoint as C
from nulsq.train import run
from nulsq.train.guards import StepSizeError
from nulsq.train.loop import NaNLossError

from conftest import CONFIG_DIR, ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

# `table` set, so that a run wrongly marked finished would count in make_tables.
BASE = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.batch_size=16",
        "dataset.image_size=8", "trainer.device=cpu", "trainer.log_interval=2", "init.batches=2",
        "pretrain.epochs=0", "trainer.epochs=1", "table=tableA"]


def _fail(tmp_path: Path, *overrides: str, error=UserError, match: str) -> Path:
    """Run with `overrides`, expect `error` matching `match`; return the run directory."""
    out = tmp_path / "run"
    with pytest.raises(error, match=match) as info:
        run(compose_config([*BASE, f"trainer.output_dir={out}", *overrides]))
    assert "\n" not in str(info.value)  # one line
    return out


def _no_result(out: Path) -> None:
    """Nothing in `out` counts as a result, and resume=auto finds nothing to continue."""
    assert not (out / "checkpoints" / "last.pt").exists()
    summary = out / "summary.json"
    assert not summary.exists() or json.loads(summary.read_text())["status"] == "failed"
    records, _ = load_runs([out.parent])
    assert records == []
    assert C.find_resume("auto", out) is None


# -- unknown names ---------------------------------------------------------------------------


@pytest.mark.parametrize("override, kind, valid", [
    ("model.name=resnet1", "model", "preresnet20"),
    ("dataset.name=cifar11", "dataset", "synthetic"),
    ("quantizer.act.kind=nulsqq", "quantizer kind", "nulsq"),
    ("optim.weights.name=sgdd", "optimizer", "adamw"),
])
def test_unknown_name_lists_the_valid_ones(tmp_path, override, kind, valid):
    name = override.split("=")[1]
    out = _fail(tmp_path, override, match=f"unknown {kind} '{name}'; valid names: .*{valid}")
    _no_result(out)


def test_unknown_config_group_option_is_one_line_listing_the_files():
    with pytest.raises(UserError, match=r"unknown model 'resnet1' .*valid model options: .*resnet18"):
        check_group_choices(["trainer.epochs=1", "model=resnet1"], CONFIG_DIR)
    with pytest.raises(UserError, match="unknown quantizer 'lsqq'"):  # a multirun list
        check_group_choices(["-m", "quantizer=lsq,lsqq"], CONFIG_DIR)
    with pytest.raises(UserError, match="unknown experiment 'tabel5'"):
        check_group_choices(["+experiment=tabel5"], CONFIG_DIR)
    check_group_choices(["model=resnet18", "quantizer=lsq,nulsq_a", "hydra/launcher=basic",
                         "model.name=anything", "hparams=table5_grid", "--cfg", "job"], CONFIG_DIR)


def test_unsupported_bits(tmp_path):
    _no_result(_fail(tmp_path, "quantizer.bits=1", match="does not support 1 bits"))


# -- data --------------------------------------------------------------------------------------


def test_missing_dataset_root(tmp_path):
    out = _fail(tmp_path, "dataset=imagenet", f"dataset.root={tmp_path / 'nowhere'}",
                match="dataset.root .*nowhere does not exist")
    _no_result(out)


def test_empty_dataset_root(tmp_path):
    empty = tmp_path / "cifar"
    empty.mkdir()
    out = _fail(tmp_path, "dataset=cifar10", f"dataset.root={empty}", "dataset.image_size=null",
                "dataset.download=false", match="CIFAR-10 not found")
    _no_result(out)
    _fail(tmp_path, "dataset=imagenet", f"dataset.root={empty}", match="train does not exist")


def test_image_folder_without_images(tmp_path):
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        (root / split / "n01440764").mkdir(parents=True)
        (root / split / "n01440764" / "README.txt").write_text("not an image")
    _no_result(_fail(tmp_path, "dataset=imagenet", f"dataset.root={root}", match="no images under"))


def test_batch_size_larger_than_the_dataset(tmp_path):
    _no_result(_fail(tmp_path, "dataset.batch_size=128", match="larger than the train split"))


@pytest.mark.parametrize("override, message", [
    ("optim.weights.lr=-0.1", "optim.weights.lr must be > 0"),
    ("optim.quant.lr=0", "optim.quant.lr must be > 0"),
    ("dataset.batch_size=-8", "dataset.batch_size must be > 0"),
    ("trainer.epochs=-1", "trainer.epochs must be > 0"),
    ("trainer.epochs=0", "trainer.epochs must be > 0"),
])
def test_non_positive_values(tmp_path, override, message):
    _no_result(_fail(tmp_path, override, match=message))


# -- files: pretrained weights, checkpoints, output directory -----------------------------------


def test_pretrained_file_missing(tmp_path):
    _no_result(_fail(tmp_path, f"model.pretrained={tmp_path / 'w.pth'}",
                     match="pretrained weights file not found: .*w.pth"))


def test_pretrained_file_corrupt(tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_bytes(b"\x00garbage, not a torch file")
    _no_result(_fail(tmp_path, f"model.pretrained={bad}", match="cannot read pretrained weights"))


def test_pretrained_file_of_another_architecture(tmp_path):
    other = tmp_path / "mlp.pth"
    torch.save(nn.Sequential(nn.Linear(4, 4)).state_dict(), other)
    _no_result(_fail(tmp_path, f"model.pretrained={other}", match="does not match architecture"))


def test_resume_from_a_corrupt_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"PK\x03\x04 torn")
    _fail(tmp_path, "trainer.resume=auto", match="corrupt or not a torch file.*delete it")


def test_resume_from_a_checkpoint_of_another_config(tmp_path):
    C.atomic_torch_save(tmp_path / "run" / "checkpoints" / "last.pt",
                        {"model": {}, "fingerprint": "0123456789abcdef"})
    _fail(tmp_path, "trainer.resume=auto", match="different config")
    assert not (tmp_path / "run" / "summary.json").exists()


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write to the output directory"):
        run(compose_config([*BASE, f"trainer.output_dir={blocker / 'run'}"]))


# -- training going wrong ----------------------------------------------------------------------


def test_nan_after_the_last_logged_step_is_caught_before_the_checkpoint(tmp_path):
    # The loss is read every 1000 steps, i.e. only at the last step of epoch 2: epoch 1 must
    # still not be checkpointed with NaN weights.
    out = _fail(tmp_path, "optim.weights.lr=1e30", "trainer.epochs=2", "trainer.log_interval=1000",
                error=NaNLossError, match=r"non-finite in qat epoch 1 \(by step 4\)")
    _no_result(out)


def _poison_a_step_size(monkeypatch) -> list[str]:
    """After init, set one weight quantizer's step to -0.5; returns [its layer name]."""
    run_module = importlib.import_module("nulsq.train.run")  # the module, not the function
    original, poisoned = run_module._init_steps, []

    def poison(cfg, model, *args, **kwargs):
        original(cfg, model, *args, **kwargs)
        name, q = next((n, q) for n, q in quantizers(model).items()
                       if q.role == "weight" and q.step_parameters() and "stage1" in n)
        for p in q.step_parameters():
            p.data.fill_(-0.5)
        poisoned.append(name)

    monkeypatch.setattr(run_module, "_init_steps", poison)
    return poisoned


def test_non_positive_step_size_stops_naming_the_layer(tmp_path, monkeypatch):
    poisoned = _poison_a_step_size(monkeypatch)
    _fail(tmp_path, "quantizer.step_guard=stop", error=StepSizeError,
          match=r"step size of quantizer '.*stage1.*weight_quant' became non-positive")
    assert poisoned[0] in str(list((tmp_path / "run").glob("summary.json"))[0].read_text())


def test_non_positive_step_size_is_clamped_and_training_goes_on(tmp_path, monkeypatch):
    _poison_a_step_size(monkeypatch)
    out = tmp_path / "run"
    summary = run(compose_config([*BASE, f"trainer.output_dir={out}", "quantizer.step_guard=clamp",
                                  "quantizer.step_floor=0.001"]))
    assert summary["status"] == "finished"
    steps = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    clamped = [v for k, v in steps.items() if "stage1" in k and k.endswith("weight_quant.step")]
    assert clamped and all(float(v.min()) >= 0.001 for v in clamped)


def test_wandb_online_without_credentials_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    started = {}

    def init(**kwargs):
        started.update(kwargs)
        return types.SimpleNamespace(id="abc", define_metric=lambda *a, **k: None)

    fake = types.SimpleNamespace(init=init, Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)  # never the network, never the real client
    with caplog.at_level(logging.WARNING):
        assert WandbRun.start({"mode": "online"}, tmp_path, {}, {"model": "m"}) is not None
    assert started["mode"] == "offline"
    assert "no API key" in caplog.text and "offline" in caplog.text


# -- the real CLI: exit status 2, the message as the last line, no traceback ------------------


def _cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "train.py", "logger=none", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last
    return last


def test_cli_unknown_group_option(tmp_path):
    proc = _cli(tmp_path, "model=resnet1", f"trainer.output_dir={tmp_path / 'run'}")
    _one_line_error(proc, "unknown model 'resnet1'", "resnet18, swin_t")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_user_error(tmp_path):
    proc = _cli(tmp_path, *BASE, "dataset=imagenet", f"dataset.root={tmp_path / 'nowhere'}",
                f"trainer.output_dir={tmp_path / 'run'}")
    _one_line_error(proc, "dataset.root", "nowhere", "does not exist")
    _no_result(tmp_path / "run")


def test_cli_nan_loss_keeps_the_last_good_checkpoint(tmp_path):
    # One FP epoch (its own lr) is checkpointed; QAT with a huge lr then diverges.
    out = tmp_path / "run"
    proc = _cli(tmp_path, *BASE, "pretrain.epochs=1", "optim.weights.lr=1e30",
                "trainer.log_interval=1", f"trainer.output_dir={out}")
    _one_line_error(proc, "training loss became", "at qat step", "lower optim.weights.lr")
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["stage"] == "fp" and ckpt["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "NaNLossError" in summary["error"]
    assert load_runs([tmp_path])[0] == []
    assert math.isfinite(summary.get("fp_top1", 0.0))


# -- downloads and data folders through the real CLI -------------------------------------------


@pytest.mark.slow
def test_cli_weights_download_cut_off_midway_leaves_nothing_in_the_cache(tmp_path):
    from pytorchcv.models.common import model_store

    from local_server import Route, local_server

    arch = "preresnet20_cifar10"
    error, sha1, release = model_store.get_model_name_suffix_data(arch)
    name = f"{arch}-{error}-{sha1[:8]}.pth"
    cache = tmp_path / "torch_models"
    with local_server() as server:
        server.routes[f"/mirror/releases/download/{release}/{name}.zip"] = Route(
            b"PK\x03\x04" + bytes(1000), declared=100_000)
        proc = _cli(tmp_path, *BASE, "model.pretrained=true", f"model.cache_dir={cache}",
                    f"trainer.output_dir={tmp_path / 'run'}",
                    env={"NULSQ_PYTORCHCV_URL": f"{server.url}/mirror", "NO_PROXY": "127.0.0.1"})
    assert server.requests, "the CLI never reached the local server"
    _one_line_error(proc, "could not download pytorchcv weights", name, "nothing was left", "curl")
    assert not cache.exists() or not any(cache.iterdir())
    _no_result(tmp_path / "run")


@pytest.mark.slow
def test_cli_nulsq_data_that_does_not_exist(tmp_path):
    proc = _cli(tmp_path, *BASE, f"trainer.output_dir={tmp_path / 'run'}",
                env={"NULSQ_DATA": str(tmp_path / "nowhere")})
    _one_line_error(proc, f"NULSQ_DATA={tmp_path / 'nowhere'} does not exist")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_cifar_with_download_false_and_no_data_names_the_path(tmp_path):
    proc = _cli(tmp_path, *BASE, "dataset=cifar10", "dataset.image_size=null", "dataset.download=false",
                f"paths.data_dir={tmp_path}", f"trainer.output_dir={tmp_path / 'run'}")
    # The preflight catches it before any data is read: the missing root, named, and the way out.
    _one_line_error(proc, f"dataset.root {tmp_path / 'cifar10'} does not exist", "dataset.download")
    assert not (tmp_path / "cifar10").exists()
    _no_result(tmp_path / "run")
