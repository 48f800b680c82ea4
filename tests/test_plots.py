"""The plotting scripts, on fabricated run directories and a hand-built quantized model."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import matplotlib.image
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import Quantizer

import conftest


def load_script(name: str) -> types.ModuleType:
    return conftest.load_script(name, "script")


plot_curves = load_script("plot_curves")
plot_levels = load_script("plot_levels")


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.shape[1] > 100 and image[..., :3].std() > 0.01


def write_run(run_dir: Path, records: list[dict], config: dict | None, torn: bool = False) -> None:
    run_dir.mkdir(parents=True)
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run_dir / "metrics.jsonl").write_text(lines + ('{"event": "ep' if torn else ""))
    if config is not None:
        OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")


def epoch(e: int, stage: str, top1: float, loss: float) -> dict:
    return {"event": "epoch", "step": 10 * e, "time": 0.0, "epoch": e, "stage": stage,
            "train/loss": loss, "val/top1": top1}


# -- plot_curves -----------------------------------------------------------------------------------
def test_epoch_curves_split_stages_and_keep_the_last_record() -> None:
    records = [
        epoch(0, "fp", 40.0, 2.0), epoch(1, "fp", 60.0, 1.0),
        {"event": "step", "step": 11, "loss": 9.0},
        epoch(0, "qat", 50.0, 1.5), epoch(1, "qat", 55.0, 1.2),
        epoch(1, "qat", 57.0, 1.1),  # logged again after a resume: this one counts
        epoch(2, "qat", float("nan"), 1.0),  # a diverged epoch: no point on the top-1 panel
    ]
    assert plot_curves.epoch_curves(records, "val/top1") == {
        "fp": ([0, 1], [40.0, 60.0]), "qat": ([0, 1], [50.0, 57.0])}
    assert plot_curves.epoch_curves(records, "train/loss")["qat"] == ([0, 1, 2], [1.5, 1.1, 1.0])


def test_run_label_reads_config_and_tolerates_missing_keys(tmp_path: Path) -> None:
    write_run(tmp_path / "a", [], {"experiment": "table5", "quantizer": {"name": "lsq", "bits": 2},
                                   "trainer": {"seed": 1}})
    write_run(tmp_path / "b", [], {"quantizer": {"name": "nulsq_a"}})
    write_run(tmp_path / "c", [], None)
    assert plot_curves.run_label(tmp_path / "a") == "table5 / lsq / 2bit / seed1"
    assert plot_curves.run_label(tmp_path / "b") == "nulsq_a"
    assert plot_curves.run_label(tmp_path / "c") == "c"


def test_plot_curves_cli_writes_a_png(tmp_path: Path, capsys) -> None:
    write_run(tmp_path / "lsq", [epoch(e, "qat", 50.0 + e, 2.0 - 0.1 * e) for e in range(4)],
              {"experiment": "t", "quantizer": {"name": "lsq", "bits": 2}, "trainer": {"seed": 0}})
    write_run(tmp_path / "nulsq", [epoch(e, "qat", 52.0 + e, 1.9 - 0.1 * e) for e in range(3)],
              {"quantizer": {"name": "nulsq_a"}}, torn=True)
    out = tmp_path / "plots" / "curves.png"
    assert plot_curves.main([str(tmp_path / "lsq"), str(tmp_path / "nulsq"), "--out", str(out)]) == 0
    assert_png(out)
    assert plot_curves.main([str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "absent" in capsys.readouterr().err


# -- plot_levels -----------------------------------------------------------------------------------
class UniformActQ(Quantizer):
    """A tiny hand-written unsigned quantizer with a fixed step: levels 0, s, 2s, 3s."""

    kind = "test_uniform"

    def __init__(self, step: float, role: str = "act") -> None:
        super().__init__(bits=2, signed=False, role=role)
        self.step = step

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x / self.step), 0, self.qp) * self.step

    def levels(self) -> torch.Tensor:
        return torch.arange(self.qp + 1, dtype=torch.float32) * self.step


def tiny_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), UniformActQ(0.5), nn.Linear(6, 3),
                         UniformActQ(0.1, role="weight"), nn.ReLU(), UniformActQ(0.25)).eval()


def test_capture_act_inputs_records_what_act_quantizers_receive() -> None:
    net = tiny_net()
    batches = [torch.randn(5, 4), torch.randn(2, 4)]
    captured = plot_levels.capture_act_inputs(net, batches)
    assert set(captured) == {"2", "6"}  # the "weight" quantizer at index 4 is not an activation
    with torch.no_grad():  # independent reference: run the layers by hand
        first = [torch.relu(net[0](b)) for b in batches]
        second = [torch.relu(net[4](net[3](net[2](f)))) for f in first]
    torch.testing.assert_close(captured["2"], torch.cat([f.reshape(-1) for f in first]))
    torch.testing.assert_close(captured["6"], torch.cat([s.reshape(-1) for s in second]))
    assert all(not m._forward_pre_hooks for m in net.modules())  # hooks removed afterwards

    sampled = plot_levels.capture_act_inputs(net, batches, max_values=4)
    assert sampled["2"].numel() == 8  # 4 per batch
    assert set(sampled["2"].tolist()) <= set(captured["2"].tolist())
    assert plot_levels.act_levels(net) == {"2": [0.0, 0.5, 1.0, 1.5], "6": [0.0, 0.25, 0.5, 0.75]}


def test_draw_levels_writes_a_png(tmp_path: Path) -> None:
    layers = {f"layer{i}.act": (torch.randn(1000).relu(), [0.0, 0.3, 0.7, 1.4]) for i in range(5)}
    out = tmp_path / "levels.png"
    plot_levels.draw_levels(layers, out)
    assert_png(out)
    with pytest.raises(UserError, match="no activation quantizers"):
        plot_levels.draw_levels({}, out)


def test_plot_levels_cli_wires_run_loading_and_data(tmp_path: Path, monkeypatch) -> None:
    """main() with stand-ins for the trainer's load_run and data builder (no trained run needed)."""
    cfg = OmegaConf.create({"dataset": {"name": "fake"}, "trainer": {"seed": 3}})
    served: list[int] = []

    def val_batches():
        for i in range(10):
            served.append(i)
            yield torch.randn(8, 4), torch.zeros(8, dtype=torch.long)

    def build(dataset_cfg, device, seed):
        assert dataset_cfg.name == "fake" and seed == 3 and str(device) == "cpu"
        return types.SimpleNamespace(val=val_batches())

    def load_run(run_dir):
        assert Path(run_dir) == tmp_path
        return tiny_net(), cfg

    monkeypatch.setitem(sys.modules, "nulsq.rundir", types.SimpleNamespace(load_run=load_run))
    monkeypatch.setitem(sys.modules, "nulsq.data", types.SimpleNamespace(build=build))
    out = tmp_path / "levels.png"
    assert plot_levels.main([str(tmp_path), "--batches", "3", "--out", str(out)]) == 0
    assert served == [0, 1, 2]  # exactly --batches batches were pulled
    assert_png(out)


# -- plot_levels on an export folder: weight and activation levels from the manifest ----------------
@pytest.mark.slow  # 44 panels: matplotlib takes several seconds
def test_plot_levels_draws_an_export_without_model_or_data(tmp_path, monkeypatch, capsys) -> None:
    from nulsq.export.exporter import export_model
    from nulsq.export.format import read_export

    from test_export import IMAGE, tiny_quantized_model

    model, cfg = tiny_quantized_model("nulsq_wa")
    export_model(model, cfg, {"num_classes": 10, "image_size": IMAGE}, tmp_path / "exp")
    manifest, tensors = read_export(tmp_path / "exp")
    fractions = plot_levels.weight_code_fractions(manifest, tensors)
    layer = manifest["layers"][1]["name"]
    codes = model.get_submodule(layer).weight_quant(model.get_submodule(layer).weight).detach()
    levels = torch.tensor(manifest["layers"][1]["weight"]["levels"])
    expected = [float((codes == level).float().mean()) for level in levels]
    assert fractions[layer] == pytest.approx(expected)  # counted from the packed codes
    assert sum(fractions[layer]) == pytest.approx(1.0)
    # no model building, no data: main() must not need either
    monkeypatch.setitem(sys.modules, "nulsq.data", None)
    out = tmp_path / "levels.png"
    assert plot_levels.main([str(tmp_path / "exp"), "--out", str(out)]) == 0
    assert_png(out)
    assert "wrote" in capsys.readouterr().out
