"""Progressive fine-tuning's merge of adjacent step sizes (supplement D-III), and the run that
starts from a (b+1)-bit run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nulsq.quant.progressive import merge_adjacent
from nulsq.rundir import last_checkpoint
from nulsq.train import run
from nulsq.train.preflight import _SOURCE, preflight, progressive_source

from conftest import compose_config


@pytest.mark.parametrize(
    "old_count, new_count",
    [(7, 3), (3, 1), (4, 2), (2, 1), (255, 127), (128, 64)],  # Qp 3->2, 2->1 bits; Qn; 8->7 bits
)
def test_new_levels_are_every_second_old_level(old_count: int, new_count: int) -> None:
    old = 0.05 + torch.rand(old_count, generator=torch.Generator().manual_seed(old_count))
    new = merge_adjacent(old, new_count)
    old_levels = torch.cumsum(old.double(), 0)
    expected = old_levels[1::2][:new_count]  # old levels 2, 4, 6, ... (1-based)
    assert new.shape == (new_count,)
    torch.testing.assert_close(torch.cumsum(new.double(), 0), expected)


def test_docstring_example() -> None:
    old = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64)
    expected = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)
    torch.testing.assert_close(merge_adjacent(old, 3), expected)


def test_keeps_dtype_device_and_detaches() -> None:
    old = torch.full((4,), 0.5, dtype=torch.bfloat16, requires_grad=True)
    new = merge_adjacent(old, 2)
    assert new.dtype == torch.bfloat16 and new.device == old.device and not new.requires_grad
    assert new.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("old_count, new_count", [(3, 2), (1, 1), (0, 1)])
def test_too_few_old_steps(old_count: int, new_count: int) -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        merge_adjacent(torch.ones(old_count), new_count)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1-D"):
        merge_adjacent(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="at least 1"):
        merge_adjacent(torch.ones(4), 0)


def test_a_progressive_run_reads_its_source_checkpoint_once(tiny_run, tmp_path, one_thread, monkeypatch):
    short = ("pretrain.epochs=0", "trainer.max_steps=1", "quantizer=lsq")
    run(compose_config(tiny_run(*short, "quantizer.bits=3", out=tmp_path / "src")))
    source = last_checkpoint(tmp_path / "src").resolve()
    reads = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):
        if isinstance(f, (str, Path)) and Path(f).resolve() == source:
            reads.append(f)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    cfg = compose_config(tiny_run(*short, "quantizer.bits=2", f"init.from_run={tmp_path / 'src'}"))
    preflight(cfg)  # as train.py's command line does, before run() checks again
    run(cfg)
    assert len(reads) == 1, reads
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "init")["method"] == "progressive"


def test_the_source_is_read_again_once_it_changed_and_dropped_after_use(tmp_path, monkeypatch):
    path = tmp_path / "src.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "fingerprint": "a"}, path)
    cfg = compose_config([f"init.from_run={path}"])
    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or real_load(f, *a, **k))
    assert progressive_source(cfg)[1]["model"]["w"].tolist() == [0.0, 0.0]
    assert progressive_source(cfg)[0] == path and len(reads) == 1
    # retrained meanwhile (a bigger file: mtime alone may not tell within the clock's granularity)
    torch.save({"model": {"w": torch.ones(100)}, "fingerprint": "b"}, path)
    assert progressive_source(cfg, keep=False)[1]["model"]["w"].sum() == 100
    assert len(reads) == 2 and not _SOURCE
