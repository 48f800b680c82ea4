"""One place knows what a run directory is: the scanners of resume, init.from_run and make_tables."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from nulsq import rundir as R
from nulsq.errors import UserError


def _run(folder: Path, status: str | None, checkpoint: bool, mtime: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("experiment: exp\n")
    if status is not None:
        (folder / "summary.json").write_text(json.dumps({"status": status}))
    if checkpoint:
        ckpt = R.last_checkpoint(folder)
        ckpt.parent.mkdir()
        ckpt.write_bytes(b"")
        os.utime(ckpt, (mtime, mtime))
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """runs/exp/{done_old, done_new (finished), killed (no summary), failed (no checkpoint)}."""
    exp = tmp_path / "runs" / "exp"
    _run(exp / "done_old", "finished", True, 1_000)
    _run(exp / "done_new", "finished", True, 2_000)
    _run(exp / "killed", None, True, 3_000)
    _run(exp / "failed", "failed", False, 0)
    (exp / "done_new" / ".hydra").mkdir()
    (exp / "done_new" / ".hydra" / "config.yaml").write_text("x: 1\n")  # Hydra's: not a run
    (exp / "notes").mkdir()  # a folder with neither
    return tmp_path / "runs"


def test_run_dirs_know_a_run_from_hydra_and_other_folders(runs):
    exp = runs / "exp"
    assert list(R.run_dirs([runs, runs / "absent"])) == [exp / n for n in ("done_new", "done_old",
                                                                          "failed", "killed")]
    assert list(R.find_run_dirs([runs])) == [exp / n for n in ("done_new", "done_old", "failed")]
    assert [R.status(exp / n) for n in ("done_new", "killed", "failed")] == ["finished", None, "failed"]


def test_a_run_name_means_its_newest_finished_run(runs):
    assert R.resolve_checkpoint("exp", runs_root=runs) == R.last_checkpoint(runs / "exp" / "done_new")
    assert R.resolve_checkpoint(runs / "exp" / "killed") == R.last_checkpoint(runs / "exp" / "killed")
    with pytest.raises(UserError, match=r"init.from_run=nope: no checkpoint there .*run name"):
        R.resolve_checkpoint("nope", runs_root=runs)
    with pytest.raises(UserError, match=r"eval.py .*: no checkpoint there \(expected a checkpoint file "
                                        r"or a run directory with checkpoints/last.pt\)$"):
        R.resolve_checkpoint(runs / "exp", runs_root=None, what=f"eval.py {runs / 'exp'}")


def test_resume_auto_takes_the_newest_unfinished_sibling(runs):
    assert R.find_resume("auto", runs / "exp" / "new") == R.last_checkpoint(runs / "exp" / "killed")
    assert R.find_resume("null", runs / "exp" / "new") is None
    assert R.find_resume(str(runs / "exp" / "done_old"), runs) == R.last_checkpoint(runs / "exp" / "done_old")
