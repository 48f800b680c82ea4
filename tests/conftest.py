"""Shared test helpers: compose the real Hydra config and shrink it, as users' smoke runs do."""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path

import pytest
import torch

from nulsq.cli import compose
from nulsq.config import register_schema

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
register_schema()


SCRIPTS = ROOT / "scripts"


def load_script(name: str, prefix: str = "script") -> types.ModuleType:
    """scripts/<name>.py as a module named <prefix>_<name> (a prefix of its own gives a test file
    its own instance)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def grads(op, x0: torch.Tensor, dy: torch.Tensor, params: list[torch.Tensor]):
    """op(x, *params) and the gradients of sum(dy * y) for x and every param (fresh leaves each
    call; an unused one gets zeros)."""
    x = x0.clone().requires_grad_()
    ps = [p.clone().requires_grad_() for p in params]
    y = op(x, *ps)
    got = torch.autograd.grad((y * dy).sum(), [x, *ps], allow_unused=True)
    return y.detach(), [g if g is not None else torch.zeros_like(t) for g, t in zip(got, [x, *ps])]


def compose_config(overrides: list[str] | None = None, logger: str = "none"):
    """The config `python train.py <overrides>` would run, with W&B off unless asked; a key or
    value the schema refuses raises the UserError train.py would print."""
    return compose([f"logger={logger}", *(overrides or [])], CONFIG_DIR)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for tiny CPU jobs: thread start-up costs more than it saves there, and
    on a shared 2-core machine OpenMP's spin-waiting costs 5-10x the CPU time."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_run(tmp_path):
    """Overrides for a seconds-long CPU run on synthetic data writing into tmp_path."""

    def make(*extra: str, out: Path | None = None) -> list[str]:
        return [
            "dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32",
            "dataset.batch_size=16", "dataset.image_size=16",
            "trainer.device=cpu", "trainer.log_interval=2", "init.batches=2",
            f"trainer.output_dir={out or tmp_path / 'run'}", *extra,
        ]

    return make
