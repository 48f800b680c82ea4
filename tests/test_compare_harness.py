"""scripts/compare_with_authors.py's own parts, with two copies of our model standing in for the
authors' side (their code is not a dependency of this project)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness():
    spec = importlib.util.spec_from_file_location("compare_with_authors",
                                                  ROOT / "scripts" / "compare_with_authors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _side(harness, method: str, bits: int, batches, lr: float = 0.04, seed: int = 0):
    hyper = harness.Hyper(lr=lr)
    cfg = harness.our_config(method, bits, hyper, init_batches=len(batches))
    torch.manual_seed(seed)
    model = harness.build_ours_fp(cfg, torch.device("cpu"))
    return harness.our_side(cfg, model, batches)


def test_the_name_map_covers_every_quantizer_parameter(harness, one_thread) -> None:
    batches = harness.synthetic_batches(1, 4, seed=0, device=torch.device("cpu"))
    side = _side(harness, "nulsq_wa", 3, batches)
    quant = sorted(side.steps)
    assert quant and all(".weight_quant." in n or ".act_quant." in n for n in quant)
    for name in quant:
        theirs, index = harness.authors_name(name, qn=4)
        layer = name.split(".weight_quant.")[0] if ".weight_quant." in name else name.split(".act_quant.")[0]
        assert theirs == layer + (".w_scale" if ".weight_quant." in name else ".x_scale")
        assert index == {"pos_steps": slice(4, None), "neg_steps": slice(0, 4)}[name.rsplit(".", 1)[1]]
    assert harness.authors_name("features.x.conv.act_quant.step", qn=0) == ("features.x.conv.x_scale", 0)
    assert harness.authors_name("features.x.conv.weight", qn=0) == ("features.x.conv.weight", None)


def test_two_copies_of_our_training_agree_exactly(harness, one_thread) -> None:
    device = torch.device("cpu")
    batches = harness.synthetic_batches(5, 8, seed=1, device=device)
    a = _side(harness, "nulsq_a", 2, batches[:2])
    b = _side(harness, "nulsq_a", 2, batches[:2])
    lines: list[str] = []
    report = harness.compare(a, b, batches[2:4], batches[4:], steps=3, tol=1e-4, step_tol=1e-3,
                             emit=lines.append)
    assert report.ok and report.init_net == 0 and report.init_steps == 0
    assert [row[0] for row in report.rows] == [1, 2, 3]
    assert all(la == lb and net == 0 and step == 0 for _, la, lb, net, step in report.rows)
    assert report.agree == 1.0 and report.top1[0] == report.top1[1]
    assert lines[-1].endswith("OK")


def test_a_planted_difference_is_reported_as_divergence(harness, one_thread) -> None:
    device = torch.device("cpu")
    batches = harness.synthetic_batches(5, 8, seed=2, device=device)
    a = _side(harness, "lsq", 2, batches[:2], lr=0.04)
    b = _side(harness, "lsq", 2, batches[:2], lr=0.05)  # the planted difference: another lr
    lines: list[str] = []
    report = harness.compare(a, b, batches[2:4], batches[4:], steps=2, tol=1e-4, step_tol=1e-3,
                             emit=lines.append)
    assert not report.ok
    assert report.rows[0][3] > 1e-4  # the weights moved differently in the first step
    assert any("beyond tolerance" in line for line in lines) and lines[-1].endswith("DIVERGED")


def test_free_run_counts_the_steps_that_stay_equal(harness, one_thread) -> None:
    device = torch.device("cpu")
    batches = harness.synthetic_batches(5, 8, seed=3, device=device)
    a = _side(harness, "nulsq_a", 2, batches[:2])
    b = _side(harness, "nulsq_a", 2, batches[:2])
    with torch.no_grad():  # a planted offset the free run never undoes
        next(b.model.parameters()).add_(0.5)
    report = harness.compare(a, b, batches[2:4], batches[4:], steps=2, tol=1e-4, step_tol=1e-3,
                             resync=False, emit=lambda line: None)
    assert not report.ok and report.steps_within == 0


def test_a_missing_or_wrong_clone_is_one_line_naming_where_to_get_it(harness, tmp_path, capsys) -> None:
    assert harness.main(["--authors", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and harness.AUTHORS_URL in err and "git clone" in err
    assert harness.main([]) == 2
    assert harness.AUTHORS_URL in capsys.readouterr().err
