"""The figures (nulsq/plots) and the evaluation-time histograms they draw (nulsq/log/histograms.py).

Figures are checked through matplotlib's objects: axis labels, how many lines and bands, where the
published line lies, the legend's texts, font sizes; the histograms against numpy in float64.
"""

from __future__ import annotations

import json
import statistics
import sys
import types
from pathlib import Path

import matplotlib.image
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import yaml
from matplotlib.text import Text
from torch import nn

from nulsq import results as tables
from nulsq.errors import UserError
from nulsq.log.histograms import (
    HISTOGRAM_BINS,
    decision_thresholds,
    eval_histograms,
    record_histograms,
    sample_values,
)
from nulsq.plots import curves, levels, results
from nulsq.plots.runs import group_runs, load_run
from nulsq.plots.style import MIN_FONT_PT, output_path
from nulsq.quant.quantizers import LSQQuantizer, NuLSQQuantizer
from nulsq.quant.rivals.apot import APoTQuantizer
from nulsq.quant.rivals.dorefa import DoReFaQuantizer
from nulsq.quant.rivals.lcq import LCQQuantizer
from nulsq.quant.rivals.lqnets import LQNetsQuantizer
from nulsq.quant.rivals.pact import PACTQuantizer

import conftest
from conftest import compose_config


def load_script(name: str) -> types.ModuleType:
    return conftest.load_script(name, "figures_script")


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def assert_readable(fig: plt.Figure) -> None:
    """Every visible text of the figure is at least MIN_FONT_PT points."""
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    assert texts
    small = [(t.get_text(), t.get_fontsize()) for t in texts if t.get_fontsize() < MIN_FONT_PT]
    assert not small, small


# -- fabricated runs ------------------------------------------------------------------------------
def config(method: str, bits: int, seed: int, qlr: float = 0.001, table: str | None = "T",
           quantized: bool = True) -> dict:
    """The parts of a resolved config.yaml that the figures read, plus a path that must not matter."""
    return {"experiment": f"t_{bits}bit", "table": table, "model": {"name": "net"},
            "dataset": {"name": "toy", "val_split": 0.0},
            "quantizer": {"name": method, "bits": bits,
                          "weight": {"kind": "lsq"} if quantized else None,
                          "act": {"kind": "lsq"} if quantized else None},
            "optim": {"quant": {"lr": qlr}},
            "trainer": {"seed": seed, "output_dir": f"/somewhere/{method}{seed}"}}


def epoch(e: int, stage: str, top1: float, loss: float) -> dict:
    return {"event": "epoch", "step": 10 * e, "time": 0.0, "epoch": e, "stage": stage,
            "train/loss": loss, "val/top1": top1}


def write_run(run_dir: Path, cfg: dict | None, records: list[dict], top1: float | None = None) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if cfg is not None:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    summary = {"status": "finished", "top1": top1 if top1 is not None else records[-1].get("val/top1")}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return run_dir


def qat_curve(base: float, epochs: int = 4, fp_epochs: int = 0) -> list[dict]:
    fp = [epoch(e, "fp", 30.0 + 10 * e, 2.0 - 0.2 * e) for e in range(1, fp_epochs + 1)]
    return fp + [epoch(e, "qat", base + e, 1.0 - 0.1 * e) for e in range(1, epochs + 1)]


def paper_file(tmp_path: Path) -> Path:
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump({"tables": {"T": {
        "title": "Table T", "bits": [2, 3],
        "rows": {"net": {"lsq": {2: 70.5, 3: None}, "nulsq_a": {2: {"mean": 71.25, "std": 0.1}, 3: 74.0}}},
        "labels": {"lsq": "LSQ", "nulsq_a": "nuLSQ-A"}}}}))
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> list[Path]:
    """LSQ 2-bit seeds 0-2, nuLSQ-A 2-bit seeds 0-1, nuLSQ-A 2-bit seed 0 with another quantizer
    lr, and a rerun of LSQ seed 0 in another folder (the same config and seed)."""
    runs = [write_run(tmp_path / "runs" / f"lsq_seed{s}" / "t0", config("lsq", 2, s), qat_curve(60.0 + s))
            for s in range(3)]
    runs += [write_run(tmp_path / "runs" / f"nulsq_seed{s}" / "t0", config("nulsq_a", 2, s),
                       qat_curve(62.0 + 2 * s, fp_epochs=2)) for s in range(2)]
    runs.append(write_run(tmp_path / "runs" / "nulsq_lr" / "t0", config("nulsq_a", 2, 0, qlr=0.01),
                          qat_curve(50.0)))
    runs.append(write_run(tmp_path / "runs" / "lsq_seed0" / "t1", config("lsq", 2, 0), qat_curve(55.0)))
    return runs


# -- grouping and labels --------------------------------------------------------------------------
def test_groups_pool_seeds_split_on_settings_and_keep_reruns_apart(sweep: list[Path]) -> None:
    runs = [load_run(p) for p in sweep]
    groups = group_runs(runs, ["method", "bits"], {"lsq": "LSQ", "nulsq_a": "nuLSQ-A"})
    by_label = {g.label: sorted(str(r.path.relative_to(sweep[0].parents[2])) for r in g.runs) for g in groups}
    assert by_label == {
        # LSQ seed 0 twice (t0 and t1): reruns, not replicates; each alone, named by its folder.
        "LSQ 2-bit seed 0 (lsq_seed0/t0)": ["runs/lsq_seed0/t0"],
        "LSQ 2-bit seed 1 (lsq_seed1/t0)": ["runs/lsq_seed1/t0"],
        "LSQ 2-bit seed 2 (lsq_seed2/t0)": ["runs/lsq_seed2/t0"],
        "LSQ 2-bit seed 0 (lsq_seed0/t1)": ["runs/lsq_seed0/t1"],
        # The lr tells the nuLSQ groups apart; trainer.output_dir (a path) never does.
        "nuLSQ-A 2-bit lr=0.001": ["runs/nulsq_seed0/t0", "runs/nulsq_seed1/t0"],
        "nuLSQ-A 2-bit lr=0.01": ["runs/nulsq_lr/t0"],
    }
    assert len({g.label for g in groups}) == len(groups)
    with pytest.raises(UserError, match="unknown --group-by key 'methd': no run's config.yaml has 'methd'"):
        group_runs(runs, ["methd"])


def test_legacy_run_label_and_curves_still_read_runs(sweep: list[Path]) -> None:
    assert curves.run_label(sweep[0]) == "t_2bit / lsq / 2bit / seed0"
    assert curves.epoch_curves(load_run(sweep[3]).records, "val/top1")["fp"] == ([1, 2], [40.0, 50.0])


# -- curves ---------------------------------------------------------------------------------------
def test_curves_figure_mean_band_paper_line_and_labels(tmp_path: Path) -> None:
    seeds = [write_run(tmp_path / f"nulsq{s}", config("nulsq_a", 2, s),
                       [epoch(e, "qat", 60.0 + e + 1.5 * s ** 2, 1.0 / e) for e in range(1, 6)])
             for s in range(3)]
    lsq = write_run(tmp_path / "lsq0", config("lsq", 2, 0), qat_curve(58.0, epochs=5))
    fp_only = write_run(tmp_path / "fp", config("fp", 32, 0, table=None, quantized=False),
                        [epoch(e, "fp", 70.0 + e, 0.5) for e in range(1, 4)])
    paper = tables.load_paper(paper_file(tmp_path))
    fig = curves.curves_figure([*seeds, lsq, fp_only], paper=paper)
    top1, loss = fig.axes[:2]
    assert top1.get_ylabel() == "validation top-1 (%)" and top1.get_xlabel() == ""
    assert loss.get_xlabel() == "QAT epoch" and loss.get_ylabel() == "training loss (cross-entropy)"

    means = [line for line in top1.lines if line.get_gid() == "mean"]
    assert len(means) == 3  # nuLSQ-A (3 seeds), LSQ, the FP-only run
    bands = [c for c in top1.collections if c.get_gid() == "band"]
    assert len(bands) == 1  # only the group with several seeds has a band
    # The nuLSQ line: the mean over seeds per epoch; its band: mean ± sample std (float64 reference).
    per_epoch = [[60.0 + e + 1.5 * s ** 2 for s in range(3)] for e in range(1, 6)]
    np.testing.assert_allclose(means[0].get_xdata(), [1, 2, 3, 4, 5])
    np.testing.assert_allclose(means[0].get_ydata(), [np.mean(v) for v in per_epoch])
    band_y = bands[0].get_paths()[0].vertices[:, 1]
    lows = [np.mean(v) - np.std(v, ddof=1) for v in per_epoch]
    highs = [np.mean(v) + np.std(v, ddof=1) for v in per_epoch]
    np.testing.assert_allclose([band_y.min(), band_y.max()], [min(lows), max(highs)])

    # The published numbers of the two runs' table cells, as dashed lines (nuLSQ: the mean of a cell).
    paper_lines = [line for line in top1.lines if line.get_gid() == "paper"]
    assert sorted(line.get_ydata()[0] for line in paper_lines) == [70.5, 71.25]
    assert all(line.get_linestyle() == "--" for line in paper_lines)

    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["nuLSQ-A 2-bit, 3 seeds", "nuLSQ-A 2-bit: published 71.25%", "LSQ 2-bit",
                      "LSQ 2-bit: published 70.5%", "fp 32-bit (FP run)"]
    assert fig.legends[0].get_title().get_text() == "mean ± 1 std over seeds"
    assert all(float(t).is_integer() for t in top1.get_xticks())
    assert fig._suptitle.get_text() == "net on toy"
    assert_readable(fig)


def test_curves_minmax_band_and_fp_column(sweep: list[Path], tmp_path: Path) -> None:
    fig = curves.curves_figure(sweep[3:5], band="minmax", show_fp=True)
    (fp_top1, qat_top1), (fp_loss, qat_loss) = np.reshape(fig.axes, (2, 2))
    assert fp_loss.get_xlabel() == "FP pretraining epoch" and qat_loss.get_xlabel() == "QAT epoch"
    assert "FP pretraining" in fp_top1.get_title() and fp_top1.get_facecolor() != qat_top1.get_facecolor()
    fp_line = [line for line in fp_top1.lines if line.get_gid() == "mean"]
    qat_line = [line for line in qat_top1.lines if line.get_gid() == "mean"]
    # Both stages start at their own epoch 1, each on its own axis.
    assert list(fp_line[0].get_xdata()) == [1, 2] and list(qat_line[0].get_xdata()) == [1, 2, 3, 4]
    band_y = [c for c in qat_top1.collections if c.get_gid() == "band"][0].get_paths()[0].vertices[:, 1]
    assert (band_y.min(), band_y.max()) == (63.0, 68.0)  # min over seeds at epoch 1, max at epoch 4
    assert fig.legends[0].get_title().get_text() == "mean, min-max over seeds"
    assert_readable(fig)


def test_plot_curves_cli_formats_and_errors(sweep: list[Path], tmp_path: Path, capsys) -> None:
    script = load_script("plot_curves")
    out = tmp_path / "fig" / "curves.png"
    paper = paper_file(tmp_path)
    args = [str(p) for p in sweep] + ["--out", str(out), "--paper", str(paper)]
    assert script.main(args) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert script.main(args + ["--format", "pdf", "--group-by", "method"]) == 0
    assert out.with_suffix(".pdf").read_bytes()[:5] == b"%PDF-"
    assert script.main(args + ["--format", "svg", "--no-paper"]) == 0
    assert b"<svg" in out.with_suffix(".svg").read_bytes()[:2000]
    assert script.main(args[:-1] + [str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    with pytest.raises(UserError, match="unknown figure format 'tiff'; valid: png, pdf, svg"):
        output_path(out, "tiff")


# -- histograms -----------------------------------------------------------------------------------
class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 4)
        self.fc.act_quant = LSQQuantizer(bits=2, signed=False, role="act")
        self.fc.weight_quant = NuLSQQuantizer(bits=2, signed=True, role="weight")
        with torch.no_grad():
            self.fc.act_quant.step.fill_(0.4)
            self.fc.weight_quant.pos_steps.copy_(torch.tensor([0.2]))
            self.fc.weight_quant.neg_steps.copy_(torch.tensor([0.1, 0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.fc.act_quant(x), self.fc.weight_quant(self.fc.weight), self.fc.bias)


def test_record_histograms_against_numpy() -> None:
    model = TwoLayers().train()
    batches = [torch.randn(6, 5).relu() * 2, torch.randn(3, 5) * 3]  # the second exceeds the range
    hist = record_histograms(model, batches)["histograms"]
    assert model.training and not any(m._forward_pre_hooks for m in model.modules())

    act = hist["fc.act_quant"]
    first = batches[0].double().numpy().ravel()
    lo, hi = min(first.min(), 0.0), max(first.max(), 1.2)  # widened to the levels 0, .4, .8, 1.2
    np.testing.assert_allclose(act["range"], [lo, hi], rtol=1e-6)
    everything = torch.cat([b.reshape(-1) for b in batches]).double().numpy()
    expected, _ = np.histogram(everything, bins=HISTOGRAM_BINS, range=(act["range"][0], act["range"][1]))
    assert act["counts"] == expected.tolist()
    assert (act["below"], act["above"]) == (int((everything < lo).sum()), int((everything > hi).sum()))
    assert act["batches"] == 2 and act["role"] == "act"
    np.testing.assert_allclose(act["thresholds"], [0.2, 0.6, 1.0], rtol=1e-6)

    weight = hist["fc.weight_quant"]  # counted once, although two batches ran
    assert weight["batches"] == 1 and sum(weight["counts"]) == 20 and weight["below"] == weight["above"] == 0
    # nuLSQ levels -0.4, -0.1, 0, 0.2: the decision thresholds are the midpoints.
    np.testing.assert_allclose(weight["thresholds"], [-0.25, -0.05, 0.1], rtol=1e-6)


def test_sample_values_keeps_every_value_of_small_tensors_and_an_even_sample_of_large_ones() -> None:
    x = torch.randn(2, 3, 4, 5)
    cl = x.to(memory_format=torch.channels_last)
    assert torch.equal(sample_values(cl).sort().values, x.reshape(-1).sort().values)
    assert sample_values(cl).data_ptr() == cl.data_ptr()  # a view of the memory, no copy
    big = torch.arange(1000.0)
    sample = sample_values(big, max_values=100)
    assert torch.equal(sample, big[::11])  # the smallest prime stride above 7 that fits
    assert torch.equal(sample_values(big, max_values=10), big[::101])


def test_decision_thresholds_only_where_they_are_midpoints() -> None:
    assert decision_thresholds(LCQQuantizer(bits=3, signed=False, role="act")) is None  # companded
    assert decision_thresholds(APoTQuantizer(bits=3, signed=True, role="weight")) is None  # standardised
    apot_act = APoTQuantizer(bits=2, signed=False, role="act", clip_init=2.0)
    levels = apot_act.levels().double().numpy()
    np.testing.assert_allclose(decision_thresholds(apot_act), (levels[1:] + levels[:-1]) / 2, rtol=1e-6)


def test_thresholds_are_where_the_quantizer_switches_levels() -> None:
    """Just below each drawn threshold a quantizer outputs the lower level, just above the upper."""
    nulsq = NuLSQQuantizer(bits=3, signed=True, role="weight")
    with torch.no_grad():
        nulsq.pos_steps.copy_(torch.tensor([0.1, 0.3, 0.2]))
        nulsq.neg_steps.copy_(torch.tensor([0.2, 0.1, 0.4, 0.3]))
    quantizers = [LSQQuantizer(bits=2, signed=True, role="weight"), nulsq,
                  PACTQuantizer(bits=2, signed=False, role="act", clip_init=2.0),
                  APoTQuantizer(bits=3, signed=False, role="act", clip_init=1.5),
                  LQNetsQuantizer(bits=2, signed=False, role="act"),
                  DoReFaQuantizer(bits=2, signed=False, role="act")]
    for q in quantizers:
        q.eval()
        levels = q.levels().double()
        thresholds = torch.tensor(decision_thresholds(q), dtype=torch.float64)
        assert thresholds.numel() == levels.numel() - 1, q.kind
        with torch.no_grad():
            below = q.quantize((thresholds - 1e-4).float()).double()
            above = q.quantize((thresholds + 1e-4).float()).double()
        torch.testing.assert_close(below, levels[:-1], atol=1e-6, rtol=0, msg=q.kind)
        torch.testing.assert_close(above, levels[1:], atol=1e-6, rtol=0, msg=q.kind)


def test_eval_histograms_reads_a_few_batches_and_only_on_rank_zero() -> None:
    served = []

    def loader():
        for i in range(10):
            served.append(i)
            yield torch.rand(2, 5), torch.zeros(2)

    assert eval_histograms(TwoLayers(), loader(), dist=types.SimpleNamespace(is_main=False)) == {}
    assert served == []
    out = eval_histograms(TwoLayers(), loader(), batches=3)
    assert served == [0, 1, 2] and out["histograms"]["fc.act_quant"]["batches"] == 3
    # Iterating a torch DataLoader draws from the global generator; the recording puts it back.
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.rand(8, 5), torch.zeros(8)),
                                       batch_size=4)
    model = TwoLayers()
    before = torch.get_rng_state()
    eval_histograms(model, data, batches=1)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.slow
def test_training_records_histograms_that_plot_levels_draws_without_data(tmp_path, tiny_run, one_thread,
                                                                         monkeypatch, capsys) -> None:
    """A real CPU run (nuLSQ weights and activations) records the histograms; plot_levels draws
    them with the dataset builder and the checkpoint loader made unusable."""
    from nulsq.train.run import run

    out = tmp_path / "run"
    run(compose_config(tiny_run("quantizer=nulsq_wa", "pretrain.epochs=0", "trainer.epochs=1", out=out)))
    event = [r for r in load_run(out).records if r["event"] == "quantizers"][-1]
    assert set(event["histograms"]) == set(event["layers"])
    model = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["model"]
    for name, h in event["histograms"].items():
        total = sum(h["counts"]) + h["below"] + h["above"]
        if h["role"] == "weight":  # every weight of the layer once
            assert total == model[name.rsplit(".", 1)[0] + ".weight"].numel() and h["batches"] == 1
        else:  # 32 validation images in 2 batches of 16
            assert h["batches"] == 2 and total % 32 == 0
    nulsq_act = [h for n, h in event["histograms"].items()
                 if event["layers"][n]["kind"] == "nulsq" and h["role"] == "act"][0]
    assert len(nulsq_act["thresholds"]) == 3  # 2-bit unsigned: 4 levels, 3 midpoints

    def no_data(*args, **kwargs):
        raise AssertionError("plot_levels must not need the dataset or the model")

    monkeypatch.setitem(sys.modules, "nulsq.data", types.SimpleNamespace(build=no_data))
    script = load_script("plot_levels")
    monkeypatch.setattr(script, "captured_views", no_data)
    figure = tmp_path / "levels.svg"
    assert script.main([str(out), "--out", str(figure), "--layers", "stage1.unit1"]) == 0
    assert b"<svg" in figure.read_bytes()[:2000]

    views, epoch_no = levels.recorded_views(load_run(out))
    fig = levels.levels_figure([("", views)], layers="stage1.unit1.body.conv1")
    act_ax, weight_ax = fig.axes
    assert act_ax.get_xlabel() == "activation value (layer input)"
    assert weight_ax.get_xlabel() == "weight value"
    assert act_ax.get_ylabel() == "fraction of values" and act_ax.get_yscale() == "log"
    for ax, name in ((act_ax, "act_quant"), (weight_ax, "weight_quant")):
        view = views[f"features.stage1.unit1.body.conv1.conv.{name}"]
        levels_drawn = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == "level")
        np.testing.assert_allclose(levels_drawn, view.levels)
        thresholds = sorted(line.get_xdata()[0] for line in ax.lines if line.get_gid() == "threshold")
        np.testing.assert_allclose(thresholds, view.thresholds)
        assert len([p for p in ax.patches if p.get_gid() == "histogram"]) == 1
    assert epoch_no == 1
    assert_readable(fig)


def view(name: str, role: str, kind: str, levels_: list[float], counts: list[int] | None = None):
    return levels.QuantizerView(name, role, kind, 2, levels_,
                                thresholds=[(a + b) / 2 for a, b in zip(levels_, levels_[1:])],
                                range=(-1.0, 2.0) if counts else None, counts=counts,
                                below=1 if counts else 0)


def test_levels_figure_two_runs_share_the_axes() -> None:
    lsq = {"l1.act_quant": view("l1.act_quant", "act", "lsq", [0, 0.5, 1.0, 1.5], [5, 0, 3, 2]),
           "l1.weight_quant": view("l1.weight_quant", "weight", "lsq", [-0.2, -0.1, 0, 0.1], [1, 2, 3, 4]),
           "l2.act_quant": view("l2.act_quant", "act", "lsq", [0, 1, 2, 3], [1, 1, 1, 1])}
    nulsq = {"l1.act_quant": view("l1.act_quant", "act", "nulsq", [0, 0.3, 0.9, 1.8], [5, 0, 3, 2]),
             "l1.weight_quant": view("l1.weight_quant", "weight", "nulsq", [-0.3, -0.1, 0, 0.2],
                                     [1, 2, 3, 4])}
    fig = levels.levels_figure([("LSQ 2-bit", lsq), ("nuLSQ 2-bit", nulsq)])
    (act1, weight1), (act2, weight2) = np.reshape(fig.axes, (2, 2))
    assert act1.get_title() == "l1 · act" and weight2.get_title() == ""  # l2 has no weight quantizer
    assert not weight2.axison and "not quantized" in weight2.texts[0].get_text()
    # Both runs on the same axes: two histograms, 4 + 4 levels, 3 + 3 thresholds; the first run's
    # lines in the upper half of the panel, the second's in the lower half.
    assert len([p for p in act1.patches if p.get_gid() == "histogram"]) == 2
    level_lines = [line for line in act1.lines if line.get_gid() == "level"]
    assert len(level_lines) == 8 and len([ln for ln in act1.lines if ln.get_gid() == "threshold"]) == 6
    assert sorted({tuple(line.get_ydata()) for line in level_lines}) == [(0.0, 0.5), (0.5, 1.0)]
    assert sorted(line.get_xdata()[0] for line in level_lines if tuple(line.get_ydata()) == (0.0, 0.5)) \
        == [0, 0.3, 0.9, 1.8]
    assert "outside the range drawn" in act1.texts[0].get_text()  # one value below the range
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:2] == ["LSQ 2-bit", "nuLSQ 2-bit"] and "learned levels" in legend
    assert_readable(fig)
    with pytest.raises(UserError, match="no quantizers to plot in layers matching 'conv9'"):
        levels.levels_figure([("", lsq)], layers="conv9")


def test_plot_levels_cli_labels_runs_apart(tmp_path: Path, monkeypatch) -> None:
    def quantizers_event(step: float) -> dict:
        return {"event": "quantizers", "step": 1, "time": 0.0, "epoch": 1,
                "layers": {"l1.act_quant": {"kind": "lsq", "role": "act", "bits": 2, "signed": False,
                                            "steps": [step], "levels": [0, step, 2 * step, 3 * step]}},
                "histograms": {"l1.act_quant": {"role": "act", "range": [0, 1], "counts": [3, 2, 1],
                                                "below": 0, "above": 0, "batches": 1, "thresholds": None}}}

    a = write_run(tmp_path / "a", config("lsq", 2, 0), [epoch(1, "qat", 50, 1), quantizers_event(0.2)])
    b = write_run(tmp_path / "b", config("nulsq_a", 2, 0), [epoch(1, "qat", 50, 1), quantizers_event(0.3)])
    script = load_script("plot_levels")
    drawn = {}
    real = script.levels_figure
    monkeypatch.setattr(script, "levels_figure",
                        lambda runs, layers, title: drawn.setdefault("fig", real(runs, layers, title)))
    assert script.main([str(a), str(b), "--out", str(tmp_path / "levels.png")]) == 0
    legend = [t.get_text() for t in drawn["fig"].legends[0].get_texts()]
    assert legend[:2] == ["LSQ 2-bit seed 0", "nuLSQ-A 2-bit seed 0"]
    assert (tmp_path / "levels.png").read_bytes()[:4] == b"\x89PNG"
    assert script.main([str(a), "--epoch", "7", "--out", str(tmp_path / "x.png")]) == 2


# -- results figure -------------------------------------------------------------------------------
def test_results_figure_content() -> None:
    rows = [results.FigureRow("net", "LSQ", 2, 70.0, 0.5, 3, 70.5),
            results.FigureRow("net", "nuLSQ-A", 2, 71.75, None, 1, None),
            results.FigureRow("net", "nuLSQ-A", 3, None, None, 0, 74.0),
            results.FigureRow("big", "LSQ", 2, 80.0, 0.25, 2, 79.5)]
    fig = results.results_figure(rows, "Table T")
    net, big = fig.axes
    assert [t.get_text() for t in net.get_yticklabels()] == ["LSQ 2-bit", "nuLSQ-A 2-bit", "nuLSQ-A 3-bit"]
    assert net.get_xlabel() == "top-1 (%)" and net.get_title() == "net"
    ours = [c for c in net.containers if c.lines[0].get_gid() == "ours"]
    assert [c.lines[0].get_xdata()[0] for c in ours] == [70.0, 71.75]
    published = [line for line in net.lines if line.get_gid() == "published"]
    assert [line.get_xdata()[0] for line in published] == [70.5, 74.0]
    notes = [t.get_text() for t in net.texts if t.get_gid() == "note"]
    assert notes == ["Δ -0.50  (n=3)", "n=1, not published", "not run"]
    assert [t.get_text() for t in big.texts if t.get_gid() == "note"] == ["Δ +0.50  (n=2)"]
    # The ± std bar: from mean - std to mean + std.
    segments = ours[0].lines[2][0].get_segments()
    np.testing.assert_allclose(segments[0][:, 0], [69.5, 70.5])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "ours: mean ± 1 std over seeds (final epoch)", "published"]
    assert_readable(fig)
    with pytest.raises(UserError, match="no results to draw"):
        results.results_figure([])


def test_write_table_figure_from_make_tables_cells(tmp_path: Path) -> None:
    paper = tables.load_paper(paper_file(tmp_path))
    runs = [write_run(tmp_path / "runs" / f"lsq{s}", config("lsq", 2, s), qat_curve(60.0), top1=70.0 + s)
            for s in range(2)]
    runs.append(write_run(tmp_path / "runs" / "nulsq3", config("nulsq_a", 3, 0), qat_curve(60.0), top1=73.0))
    records, _ = tables.load_runs([tmp_path / "runs"])
    cells = tables.aggregate(records)
    rows = results.table_rows("T", paper["T"], cells)
    assert rows == [
        results.FigureRow("net", "LSQ", 2, 70.5, statistics.stdev([70.0, 71.0]), 2, 70.5),
        results.FigureRow("net", "nuLSQ-A", 2, None, None, 0, 71.25),
        results.FigureRow("net", "nuLSQ-A", 3, 73.0, None, 1, 74.0),
    ]
    assert rows[2].diff == -1.0 and rows[0].diff == 0.0
    written = results.write_table_figure("T", paper["T"], cells, tmp_path / "out")
    assert written == [tmp_path / "out" / "tableT.png"]
    assert matplotlib.image.imread(written[0]).shape[0] > 100
    empty = {"rows": {"net": {"lsq": {2: None}}}}
    assert results.write_table_figure("Z", empty, cells, tmp_path / "out") == []
