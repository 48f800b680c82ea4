"""Every config mistake surfaces before any data is loaded or any step is trained, even when an
FP stage would run first: one line naming the key, the bad value and the valid ones, exit status
2, and no run directory (the CLI checks before Hydra makes one)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from nulsq import data
from nulsq.errors import UserError
from nulsq.quant import QUANTIZERS
from nulsq.quant.convert import accepted_args
from nulsq.train import run
from nulsq.train.plan import plan_stages
from nulsq.train.preflight import preflight

from conftest import ROOT, compose_config

# A long FP stage first (the default demo's shape): a mistake found after it would cost its epochs.
FP_FIRST = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.batch_size=16",
            "dataset.image_size=8", "trainer.device=cpu", "init.batches=2", "pretrain.epochs=50",
            "trainer.epochs=50", "table=tableA"]

# (override, what the one line must say): the cases of issue 15 and the config-only ones of
# tests/test_bad_inputs.py.
MISTAKES = [
    (["quantizer.bits=1", "trainer.max_steps=2"], ["quantizer.bits", "1 bits", "supported: 2, 3"]),
    (["quantizer.bits=9"], ["quantizer.bits", "9 bits", "supported: 2, 3"]),
    (["quantizer.act.kind=nulsqq"], ["quantizer.act.kind", "'nulsqq'", "valid names: ", "nulsq"]),
    (["quantizer=lcq", "+quantizer.act.args.KK=4"], ["quantizer.act.args.KK", "valid args: K,"]),
    (["optim.weights.lr=-0.1"], ["optim.weights.lr", "-0.1"]),
    (["optim.quant.lr=0"], ["optim.quant.lr", "> 0"]),
    (["optim.weights.name=sgdd"], ["optim.weights.name", "'sgdd'", "adamw"]),
    (["model.name=resnet1"], ["model.name", "'resnet1'", "preresnet20"]),
    (["dataset.name=cifar11"], ["dataset.name", "'cifar11'", "synthetic"]),
    (["init.method=lsqq"], ["init.method", "'lsqq'", "mse"]),
    (["trainer.epochs=0"], ["trainer.epochs", "> 0"]),
    (["dataset.batch_size=-8"], ["dataset.batch_size", "> 0"]),
    (["pretrain.lr=0"], ["pretrain.lr"]),
    (["schedule.warmup_epochs=-1"], ["schedule.warmup_epochs", ">= 0", "-1"]),
]


@pytest.fixture
def no_data(monkeypatch):
    """Loading data fails the test: the preflight must have stopped the run before."""

    def build(*args, **kwargs):
        raise AssertionError("data was loaded before the mistake was reported")

    monkeypatch.setattr(data, "build", build)


@pytest.mark.parametrize("overrides, fragments", MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_a_mistake_stops_the_run_before_data(tmp_path, no_data, overrides, fragments):
    out = tmp_path / "run"
    with pytest.raises(UserError) as info:
        run(compose_config([*FP_FIRST, f"trainer.output_dir={out}", *overrides]))
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert not out.exists()  # nothing written, not even config.yaml


@pytest.mark.parametrize("override, valid", [
    ("quantizer.step_guard=ignore", "[stop, clamp]"),
    ("quantizer.first_last=both", "[dynamic8, dynamic8_absmax, fp, same]"),
    ("quantizer.grad_scale=sqrt", "[none, lsq, authors]"),
    ("init.reduce=median", "[max, mean]"),
    ("schedule.name=step", "[cosine, constant]"),
    ("trainer.device=gpu", "[auto, cpu, cuda]"),
])
def test_a_value_off_a_fixed_list_is_refused_while_composing(override, valid):
    key, bad = override.split("=")
    with pytest.raises(UserError) as info:
        compose_config([override])
    assert key in str(info.value) and f"'{bad}'" in str(info.value) and valid in str(info.value)


def test_output_dir_under_a_file_is_refused_before_data(tmp_path, no_data):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserError, match=r"output directory .*a_file is a file.*set trainer.output_dir"):
        run(compose_config([*FP_FIRST, f"trainer.output_dir={blocker / 'run'}"]))


def test_missing_data_root_is_refused_before_data(tmp_path, no_data):
    # dataset.download=auto (the default) would fetch CIFAR into a missing root: only with
    # download off is a missing root a mistake.
    with pytest.raises(UserError, match=r"dataset.root .*nowhere does not exist"):
        run(compose_config([*FP_FIRST, "dataset=cifar10", f"dataset.root={tmp_path / 'nowhere'}",
                            "dataset.download=false", f"trainer.output_dir={tmp_path / 'run'}"]))


def test_the_plan_shows_both_stages_with_their_own_optimizers():
    cfg = compose_config(["pretrain.epochs=3", "pretrain.lr=0.2", "trainer.epochs=5"])
    fp, qat = plan_stages(cfg)
    assert (fp.name, fp.epochs, fp.quantized, fp.optim.weights.lr) == ("fp", 3, False, 0.2)
    assert (qat.name, qat.epochs, qat.quantized, qat.step_guard) == ("qat", 5, True, "stop")
    assert qat.optim.weights.lr == cfg.optim.weights.lr and fp.schedule.name == "cosine"
    assert [s.name for s in plan_stages(compose_config(["quantizer=fp"]))] == ["fp"]
    assert [s.name for s in plan_stages(compose_config(["pretrain.epochs=0"]))] == ["qat"]


def test_preflight_accepts_every_quantizer_on_a_paper_model():
    # Meta-device models: the real structure, no memory (Swin-T: signed activations).
    pairs = [("swin_t", "nulsq_wa"), ("resnet18", "lcq"), ("mobilenetv2", "apot"),
             ("preresnet20", "pact"), ("preresnet20", "lqnets"), ("preresnet20", "dorefa"),
             ("preresnet20", "fp")]
    for model, quantizer in pairs:
        stages = preflight(compose_config([f"model={model}", f"quantizer={quantizer}",
                                           "quantizer.bits=3"]))
        assert [s.name for s in stages] == (["fp"] if quantizer == "fp" else ["fp", "qat"])


def test_accepted_args_follow_the_constructors():
    assert accepted_args(QUANTIZERS.get("lsq")) == []
    assert {"K", "clip_init", "ternary_at_2bit"} <= set(accepted_args(QUANTIZERS.get("lcq")))
    assert "ste" in accepted_args(QUANTIZERS.get("apot"))


# -- the real CLI ---------------------------------------------------------------------------------

CLI_CASES = MISTAKES[:5] + [(["hydra.run.dir={blocker}/run"], ["hydra.run.dir", "is a file"])]


@pytest.mark.slow  # six CLI starts, a few CPU seconds each
@pytest.mark.parametrize("overrides, fragments", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_cli_reports_the_mistake_before_hydra_makes_a_run_directory(tmp_path, overrides, fragments):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    hydra_dir = tmp_path / "hydra_run"
    args = [o.format(blocker=blocker) for o in overrides]
    if not any(a.startswith("hydra.run.dir") for a in args):
        args.append(f"hydra.run.dir={hydra_dir}")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "train.py", "logger=none", *FP_FIRST, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(f in lines[0] for f in fragments), lines[0]
    assert not hydra_dir.exists() and not (blocker.parent / "run").exists()
    assert cpu_s < 10, f"{cpu_s:.1f} CPU seconds before the error"  # CPU time: the machine may be busy
