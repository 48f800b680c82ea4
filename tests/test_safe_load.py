"""Loading a checkpoint never runs code: a crafted pickle is refused by resume, init.from_run and
eval.py (one line, exit 2, its payload never runs); checkpoints hold only tensors and plain
values; checkpoints of the older format load only behind trainer.trust_checkpoint=true and then
still resume exactly."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nulsq.errors import UserError
from nulsq.safe_load import load_numpy_pickle, load_torch_file
from nulsq.train import checkpoint as C
from nulsq.train import run

from conftest import ROOT, compose_config

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["dataset=synthetic", "dataset.num_train=64", "dataset.num_val=32", "dataset.batch_size=16",
        "dataset.image_size=8", "trainer.device=cpu", "trainer.log_interval=2", "init.batches=2",
        "quantizer=nulsq_a", "trainer.seed=5"]


class _CreatesFile:
    """Unpickling this calls open(path, "w"): it creates `path` (a stand-in for any code)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A file shaped like a nulsq checkpoint whose pickle creates `marker` when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 2, "stage": "qat", "model": {"w": torch.zeros(1)}, "fingerprint": "0" * 16,
                "num_classes": 10, "image_size": 8, "rng": _CreatesFile(marker)}, path)
    return path


@pytest.fixture
def evil(tmp_path):
    """(a malicious checkpoint inside a run directory, the file its payload would create)."""
    marker = tmp_path / "payload_ran"
    ckpt = _malicious_checkpoint(tmp_path / "evil_run" / "checkpoints" / "last.pt", marker)
    (tmp_path / "evil_run" / "config.yaml").write_text("experiment: evil\n")
    return ckpt, marker


def test_the_payload_is_live_and_a_safe_load_refuses_it(evil):
    ckpt, marker = evil
    torch.load(ckpt, weights_only=False)  # what the trainer used to do: the payload runs ...
    assert marker.exists()
    marker.unlink()
    for trust in (False, True):  # ... and trust widens the allowlist to numpy only, never code
        with pytest.raises(UserError, match=r"refusing to load checkpoint .*would call .*open"):
            C.load_checkpoint(ckpt, trust=trust)
    assert not marker.exists()


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def _refused(proc: subprocess.CompletedProcess, marker: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("error: refusing to load") and "would call" in last, last
    assert not marker.exists()


@pytest.mark.slow
def test_resume_refuses_a_malicious_checkpoint(evil, tmp_path):
    ckpt, marker = evil
    _refused(_cli("train.py", "logger=none", *TINY, "pretrain.epochs=0", f"trainer.resume={ckpt}",
                  f"trainer.output_dir={tmp_path / 'run'}"), marker)


@pytest.mark.slow
def test_init_from_run_refuses_a_malicious_checkpoint(evil, tmp_path):
    ckpt, marker = evil
    _refused(_cli("train.py", "logger=none", *TINY, "pretrain.epochs=0", f"init.from_run={ckpt}",
                  f"trainer.output_dir={tmp_path / 'run'}"), marker)


@pytest.mark.slow
def test_eval_refuses_a_malicious_checkpoint(evil):
    ckpt, marker = evil
    _refused(_cli("eval.py", str(ckpt.parent.parent)), marker)
    assert not (ckpt.parent / "eval.json").exists()


def test_a_plain_pickle_with_a_payload_is_refused_too(tmp_path):
    # Not a torch zip file: torch's legacy reader, same restricted unpickler.
    marker, path = tmp_path / "payload_ran", tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": _CreatesFile(marker)}, protocol=2))
    with pytest.raises(UserError, match="would call .*open"):
        load_torch_file(path, "checkpoint", "delete it")
    assert not marker.exists()


# -- what a checkpoint holds ---------------------------------------------------------------------


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.normal()  # numpy caches a Gaussian: has_gauss = 1
    torch.save(C.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    C.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    got = (random.random(), np.random.normal(), np.random.rand(), torch.rand(2))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])


def test_save_checkpoint_rejects_what_a_weights_only_load_could_not_read(tmp_path):
    cfg = compose_config(TINY)
    with pytest.raises(TypeError, match=r"checkpoint\['state'\]\['best'\] is a numpy.float64"):
        C.save_checkpoint(tmp_path / "last.pt", {"model": {}, "state": {"best": np.float64(1.0)}}, cfg)
    assert not (tmp_path / "last.pt").exists()


def test_a_malformed_wandb_id_is_refused(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": {}, "fingerprint": "f", "wandb_id": "../../etc"}, path)
    with pytest.raises(UserError, match="malformed W&B run id"):
        C.load_checkpoint(path)


# -- checkpoints of the older format (numpy RNG state pickled as an array) ----------------------


def _as_old_format(path: Path) -> None:
    """Rewrite a checkpoint as nulsq wrote it before format 2: RNG states as random.getstate()
    and np.random.get_state() (a numpy array), no format or config entry."""
    ckpt = torch.load(path, weights_only=True)
    for state in ckpt["rng"]:
        py, npy = state["python"], state["numpy"]
        state["python"] = (py["version"], tuple(py["state"]), py["gauss"])
        state["numpy"] = (npy["kind"], np.asarray(npy["keys"], dtype=np.uint32), npy["pos"],
                          npy["has_gauss"], npy["cached_gaussian"])
    del ckpt["format"], ckpt["config"]
    torch.save(ckpt, path)


@pytest.mark.slow
def test_an_old_checkpoint_needs_trust_and_then_resumes_exactly(tmp_path):
    common = [*TINY, "pretrain.epochs=1", "trainer.epochs=1"]
    full = run(compose_config([*common, f"trainer.output_dir={tmp_path / 'full'}"]))
    cut = [*common, f"trainer.output_dir={tmp_path / 'cut'}"]
    run(compose_config([*cut, "trainer.max_steps=2"]))  # stopped inside the FP epoch
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    _as_old_format(last)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(last, weights_only=True)  # really the old format
    with pytest.raises(UserError, match="older nulsq.*add trainer.trust_checkpoint=true"):
        run(compose_config([*cut, "trainer.resume=auto"]))
    resumed = run(compose_config([*cut, "trainer.resume=auto", "trainer.trust_checkpoint=true"]))
    assert (resumed["top1"], resumed["fp_top1"]) == (full["top1"], full["fp_top1"])
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(last, weights_only=True)  # rewritten in the safe format by the resumed run
    assert b["format"] == C.FORMAT and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])



# -- plain pickles of numpy arrays (the CIFAR python release) -----------------------------------


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_pickles_load_with_numpy_arrays_only(tmp_path, protocol):
    data = np.arange(24, dtype=np.uint8).reshape(2, 12)
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({"data": data, "labels": [1, 2], "name": b"x"}, protocol=protocol))
    entry = load_numpy_pickle(path, "CIFAR-10 file")
    assert np.array_equal(entry["data"], data) and entry["labels"] == [1, 2]


def test_a_cifar_file_carrying_a_payload_is_refused(tmp_path):
    from nulsq.data import build, cifar

    marker = tmp_path / "payload_ran"
    folder = tmp_path / cifar.CIFAR10.folder
    folder.mkdir()
    for name in cifar.CIFAR10.files:
        (folder / name).write_bytes(pickle.dumps({"data": _CreatesFile(marker)}, protocol=2))
    pickle.loads((folder / "data_batch_1").read_bytes())  # what torchvision does: the payload runs
    assert marker.exists()
    marker.unlink()
    cfg = {"name": "cifar10", "root": str(tmp_path), "batch_size": 8}
    refused = r"refusing to read CIFAR-10 file .*data_batch_1: .*would call io.open"
    with pytest.raises(UserError, match=refused):
        build(cfg, torch.device("cpu"), 0)
    assert not marker.exists()
