"""The fidelity switches (docs/fidelity.md), each pinned to what the authors' code computes.

Every reference below is a float64 transcription, written from the description of the authors'
procedure in docs/fidelity.md, on a case small enough to check by hand: the init protocol on a
two-layer network with BatchNorm, each gradient-scale convention, the 8-bit first/last quantizer.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nulsq.errors import UserError
from nulsq.protocol import check_switches, protocol_tag, run_protocol
from nulsq.quant import functional as F
from nulsq.quant import initialize_quantizers, quantize_model
from nulsq.quant.quantizers import DynamicMaxQuantizer, LSQQuantizer, NuLSQQuantizer
from nulsq.results import aggregate, load_runs, render_table

from conftest import compose_config

# -- init.protocol ------------------------------------------------------------------------------


def qcfg(first_last="same", grad_scale="none", weight="lsq", act="nulsq"):
    return OmegaConf.create({
        "name": "nulsq_a", "bits": 2, "weight": {"kind": weight, "args": {}},
        "act": {"kind": act, "args": {}}, "grad_scale": grad_scale, "first_last": first_last,
        "signed_act": None, "step_guard": "stop", "step_floor": 1e-6})


def two_layer_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():  # non-trivial running statistics, as a pretrained network has
        net[1].running_mean.copy_(torch.tensor([0.2, -0.1, 0.3]))
        net[1].running_var.copy_(torch.tensor([1.5, 0.7, 2.0]))
        net[1].weight.copy_(torch.tensor([1.2, 0.8, 1.0]))
        net[1].bias.copy_(torch.tensor([0.1, 0.3, -0.2]))
    return net


def _q(x, s, qn, qp):
    """A uniform grid {-Qn s, ..., Qp s}, round half to even (numpy's, like torch's): the LSQ
    forward, and nuLSQ's on its uniform initial grid (no ties occur in this data)."""
    return s * np.round(np.clip(x / s, -qn, qp))


def _lsq_init(x, qp):
    return 2 * np.abs(x).mean() / math.sqrt(qp)


def authors_init_reference(net: nn.Module, batches: list[np.ndarray]) -> dict:
    """The authors' procedure in float64: train mode; per batch, every quantized layer raises its
    step to max(step, LSQ init of its current input), then quantizes with it; BatchNorm normalises
    with the batch's statistics and moves its running ones (momentum 0.1, unbiased variance)."""
    w1, b1 = (p.detach().double().numpy() for p in (net[0].weight, net[0].bias))
    w2, b2 = (p.detach().double().numpy() for p in (net[3].weight, net[3].bias))
    gamma, beta = (p.detach().double().numpy() for p in (net[1].weight, net[1].bias))
    rm, rv = net[1].running_mean.double().numpy().copy(), net[1].running_var.double().numpy().copy()
    s = {"x1": 0.0, "w1": 0.0, "x2": 0.0, "w2": 0.0}
    for x in batches:
        s["x1"] = max(s["x1"], _lsq_init(x, 1))  # the first layer's input is signed: Qn 2, Qp 1
        s["w1"] = max(s["w1"], _lsq_init(w1, 1))
        h = _q(x, s["x1"], 2, 1) @ _q(w1, s["w1"], 2, 1).T + b1
        mu, var = h.mean(0), h.var(0)
        rm = 0.9 * rm + 0.1 * mu
        rv = 0.9 * rv + 0.1 * h.var(0, ddof=1)
        a = np.maximum((h - mu) / np.sqrt(var + 1e-5) * gamma + beta, 0.0)
        s["x2"] = max(s["x2"], _lsq_init(a, 3))  # after ReLU: unsigned, Qp 3
        s["w2"] = max(s["w2"], _lsq_init(w2, 1))
    return {**s, "running_mean": rm, "running_var": rv}


def steps_of(net: nn.Module) -> dict:
    return {"x1": net[0].act_quant.pos_steps[0].item(), "w1": net[0].weight_quant.step.item(),
            "x2": net[3].act_quant.pos_steps[0].item(), "w2": net[3].weight_quant.step.item()}


def test_authors_init_protocol_matches_the_float64_transcription():
    net = two_layer_net()
    quantize_model(net, qcfg(), False, "lsq", verbose=False)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 4, generator=gen) * scale for scale in (1.0, 2.0, 0.5)]
    want = authors_init_reference(net, [b.double().numpy() for b in batches])
    net.eval()  # the protocol itself must switch to train mode, and back afterwards
    assert initialize_quantizers(net, [(b, None) for b in batches], 3, "authors") == 3
    assert not net.training
    got = steps_of(net)
    for key in ("x1", "w1", "x2", "w2"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key
    np.testing.assert_allclose(net[1].running_mean.numpy(), want["running_mean"], rtol=1e-5)
    np.testing.assert_allclose(net[1].running_var.numpy(), want["running_var"], rtol=1e-5)
    # nuLSQ starts uniform: every step of the activation quantizers takes the same value
    assert torch.all(net[3].act_quant.pos_steps == net[3].act_quant.pos_steps[0])


def test_fp_eval_protocol_keeps_bn_statistics_and_sees_the_fp_network():
    net = two_layer_net()
    quantize_model(net, qcfg(), False, "lsq", verbose=False)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    before = net[1].running_mean.clone(), net[1].running_var.clone()
    initialize_quantizers(net, [(x, None)], 1, "fp_eval")
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    # the second layer's input: eval-mode BN of the FP first layer, then ReLU
    fp = two_layer_net().eval()
    with torch.no_grad():
        a = fp[2](fp[1](fp[0](x))).double().numpy()
    assert steps_of(net)["x2"] == pytest.approx(_lsq_init(a, 3), rel=1e-5)
    authors = two_layer_net()
    quantize_model(authors, qcfg(), False, "lsq", verbose=False)
    initialize_quantizers(authors, [(x, None)], 1, "authors")
    assert steps_of(authors)["x2"] != pytest.approx(steps_of(net)["x2"], rel=1e-3)


# -- quantizer.grad_scale ------------------------------------------------------------------------


def _step_grad(q, x):
    q.quantize(x).sum().backward()  # dy = 1
    return [p.grad.double() for p in q.step_parameters()]


def _lsq_g(x, s, qn, qp):
    """Eq. 4 in float64: -Qn below, Qp above, round(x/s) - x/s between; summed with dy = 1."""
    v = x / s
    return np.where(v <= -qn, -qn, np.where(v >= qp, qp, np.round(v) - v)).sum()


ACT = np.array([0.1, 0.45, 0.7, 2.0, 0.3, 0.0, 1.4, 0.9, 0.2, 0.55, 1.1, 0.05]).reshape(2, 3, 1, 2)


@pytest.mark.parametrize("mode, n", [("none", None), ("lsq", 6), ("authors", 3)])
def test_lsq_activation_grad_scale_conventions(mode, n):
    # (B, C, H, W) = (2, 3, 1, 2): LSQ's N is 6 elements per sample, the authors' 3 channels.
    q = LSQQuantizer(bits=2, signed=False, role="act", grad_scale=mode)
    with torch.no_grad():
        q.step.fill_(0.5)
    (got,) = _step_grad(q, torch.tensor(ACT, dtype=torch.float32))
    g = 1.0 if n is None else 1 / math.sqrt(n * 3)
    assert got.item() == pytest.approx(g * _lsq_g(ACT, 0.5, 0, 3), rel=1e-6)


@pytest.mark.parametrize("mode", ["lsq", "authors"])
def test_lsq_weight_grad_scale_counts_every_element(mode):
    w = np.array([[0.3, -0.9], [0.05, 0.6], [-0.2, 1.4]])
    q = LSQQuantizer(bits=2, signed=True, role="weight", grad_scale=mode)
    with torch.no_grad():
        q.step.fill_(0.4)
    (got,) = _step_grad(q, torch.tensor(w, dtype=torch.float32))
    assert got.item() == pytest.approx(_lsq_g(w, 0.4, 2, 1) / math.sqrt(6 * 1), rel=1e-6)


def test_unsigned_nulsq_authors_grad_scale_is_one_over_sqrt_channels_times_qp():
    q = NuLSQQuantizer(bits=2, signed=False, role="act", grad_scale="authors")
    with torch.no_grad():
        q.pos_steps.fill_(0.5)
    (got,) = _step_grad(q, torch.tensor(ACT, dtype=torch.float32))
    # Equal steps, no ties in ACT: the step gradients sum to LSQ's Eq. 4.
    assert got.sum().item() == pytest.approx(_lsq_g(ACT, 0.5, 0, 3) / math.sqrt(3 * 3), rel=1e-6)


def test_symmetric_nulsq_authors_grad_scale_by_hand():
    # Levels -1.0, -0.4, 0, 0.5 (s'_1 = 0.4, s'_2 = 0.6, s_1 = 0.5); dy = 1; N = 6, Qn = 2, Qp = 1.
    # Unscaled (Eq. 10-13): 0.3 -> 1 - 0.6 = 0.4 and 0.1 -> -0.2 on s_1, 0.9 (above) -> +1 on s_1;
    # -0.1 -> 0.25 on s'_1, -0.5 -> (0.1/0.6) on s'_2, -1.3 (below) -> -1 on s'_1 and s'_2.
    w = torch.tensor([0.3, 0.9, -0.1, -0.5, -1.3, 0.1])
    pos_raw, neg_raw = np.array([1.2]), np.array([0.25 - 1, 1 / 6 - 1])
    for mode, g_pos, g_neg in (("none", 1.0, 1.0), ("lsq", 1 / math.sqrt(6), 1 / math.sqrt(6)),
                               ("authors", 2 / math.sqrt(6 * 1), 2 / math.sqrt(6 * 2))):
        q = NuLSQQuantizer(bits=2, signed=True, role="weight", grad_scale=mode)
        with torch.no_grad():
            q.pos_steps.copy_(torch.tensor([0.5]))
            q.neg_steps.copy_(torch.tensor([0.4, 0.6]))
        y = q.quantize(w)
        torch.testing.assert_close(y, torch.tensor([0.5, 0.5, 0.0, -0.4, -1.0, 0.0]))
        y.sum().backward()
        np.testing.assert_allclose(q.pos_steps.grad.double().numpy(), g_pos * pos_raw, rtol=1e-6)
        np.testing.assert_allclose(q.neg_steps.grad.double().numpy(), g_neg * neg_raw, rtol=1e-6)


def test_authors_grad_scale_counts_a_linear_layers_features():
    # Token inputs (B, T, C) of a Linear: N is C = 5 (the last dimension), not T = 7.
    net = nn.Sequential(nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2))
    quantize_model(net, qcfg(first_last="dynamic8", grad_scale="authors", act="lsq"), False,
                   "lsq", verbose=False)
    q = net[2].act_quant
    assert q.grad_scale_count(torch.zeros(2, 7, 5)) == 5 and q.grad_scale_count(torch.zeros(2, 5)) == 5


def test_scale_grad_keeps_the_forward_bit_exact():
    t = torch.tensor([0.1, 0.7, 1e-3], requires_grad=True)
    y = F.scale_grad(t, 0.3)
    assert torch.equal(y, t)
    y.sum().backward()
    torch.testing.assert_close(t.grad, torch.full((3,), 0.3))


# -- the 8-bit first/last quantizer --------------------------------------------------------------


def authors_8bit(x: np.ndarray, qp: int) -> np.ndarray:
    """Their first/last quantizer in float64: m = max(x) (signed), round(x / m * Qp) / Qp * m."""
    m = x.max()
    return np.round(x / m * qp) / qp * m


def test_authors_8bit_weight_quantizer_by_hand():
    # max(x) = 0.5 although |min| = 1.2: codes run to -305, below -127, with no clamp;
    # 0.25 / 0.5 * 127 = 63.5 is a tie, rounded half to even (64).
    x = np.array([0.5, -1.2, 0.25, 0.126, -0.3])
    q = DynamicMaxQuantizer(bits=8, signed=True, role="weight")
    xt = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    y = q.quantize(xt)
    want = authors_8bit(x, 127)
    np.testing.assert_allclose(y.detach().double().numpy(), want, rtol=1e-6)
    assert want[1] == pytest.approx(-305 / 127 * 0.5) and want[2] == pytest.approx(64 / 127 * 0.5)
    y.sum().backward()
    torch.testing.assert_close(xt.grad, torch.ones(5))  # straight through everywhere
    # the absmax convention is another quantizer: m = 1.2, clamped grid, 0.5 not representable
    old = DynamicMaxQuantizer(bits=8, signed=True, role="weight", convention="absmax")
    assert old.quantize(torch.tensor(x, dtype=torch.float32))[0].item() != pytest.approx(0.5, abs=1e-4)


def test_authors_8bit_unsigned_input_uses_qp_255():
    x = np.array([0.0, 2.0, 0.75, 1.3])
    q = DynamicMaxQuantizer(bits=8, signed=False, role="act")
    y = q.quantize(torch.tensor(x, dtype=torch.float32))
    np.testing.assert_allclose(y.double().numpy(), authors_8bit(x, 255), rtol=1e-6)
    assert q.quantize(torch.zeros(3)).eq(0).all()  # max 0: zeros, not NaN


def test_first_last_policies_pick_the_convention():
    for policy, convention in (("dynamic8", "authors"), ("dynamic8_absmax", "absmax")):
        net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2))
        quantize_model(net, qcfg(first_last=policy), False, "lsq", verbose=False)
        assert net[0].weight_quant.convention == convention == net[4].act_quant.convention
        assert (net[0].act_quant.qp, net[4].act_quant.qp, net[4].weight_quant.qp) == (127, 255, 127)


# -- item 6: ties ----------------------------------------------------------------------------------


def test_lsq_and_nulsq_with_equal_steps_differ_only_at_odd_ties():
    # x/s = 0.5 and 2.5: half to even and toward zero agree; 1.5: LSQ goes to 2, nuLSQ to 1.
    s = torch.tensor(1.0)
    x = torch.tensor([0.5, 1.5, 2.5, 0.7])
    lsq = F.lsq(x, s, 0, 3)
    nu = F.nulsq(x, torch.ones(3))
    torch.testing.assert_close(lsq, torch.tensor([0.0, 2.0, 2.0, 1.0]))
    torch.testing.assert_close(nu, torch.tensor([0.0, 1.0, 2.0, 1.0]))


# -- bad input, summary.json protocol, results rows ---------------------------------------------


@pytest.mark.parametrize("key, valid", [("init.protocol", "authors, fp_eval"),
                                        ("quantizer.grad_scale", "none, lsq, authors"),
                                        ("quantizer.first_last", "dynamic8, dynamic8_absmax, fp, same")])
def test_unknown_switch_value_is_one_line_listing_the_valid_ones(key, valid):
    with pytest.raises(UserError) as info:  # the schema's Enum refuses it while composing
        compose_config([f"{key}=bogus"])
    message = str(info.value)
    assert key in message and "'bogus'" in message and f"[{valid}]" in message
    assert "\n" not in message
    # A config built without the schema (a plain dict) meets the same list in check_switches.
    plain = OmegaConf.to_container(compose_config([]), enum_to_str=True)
    section, name = key.split(".")
    plain[section][name] = "bogus"
    with pytest.raises(UserError, match=f"unknown {key} 'bogus'; valid: {valid}$") as info:
        check_switches(OmegaConf.create(plain))
    assert "\n" not in str(info.value)


def test_unknown_protocol_fails_at_start_of_a_run(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"init.protocol.*'train'.*\[authors, fp_eval\]"):
        compose_config(["dataset=synthetic", "trainer.device=cpu", f"trainer.output_dir={out}",
                        "init.protocol=train"])
    assert not out.exists()  # nothing was started


def test_run_protocol_and_tags():
    cfg = compose_config([])
    assert run_protocol(cfg, amp=False) == {
        "init_protocol": "authors", "init_method": "mse", "init_reduce": "max", "grad_scale": "none",
        "first_last": "dynamic8", "precision": "fp32"}
    assert protocol_tag(run_protocol(cfg, amp=False)) == ""
    assert protocol_tag(None) == ""  # summaries from before the protocol was recorded
    off = {**run_protocol(cfg, amp=True), "init_protocol": "fp_eval", "grad_scale": "lsq"}
    assert protocol_tag(off) == " [init fp_eval, grad_scale lsq, bf16]"


def test_results_keep_protocols_apart(tmp_path):
    for i, (precision, top1) in enumerate((("fp32", 70.0), ("bf16", 60.0), ("fp32", 72.0))):
        run_dir = tmp_path / f"r{i}"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(
            "table: D\nmodel: {name: preresnet18}\nquantizer: {name: nulsq_a, bits: 2}\n"
            f"trainer: {{seed: {i}}}\ninit: {{method: lsq}}\noptim: {{quant: {{name: sgd}}}}\n")
        protocol = {"init_protocol": "authors", "grad_scale": "authors", "first_last": "dynamic8",
                    "precision": precision}
        (run_dir / "summary.json").write_text(json.dumps(
            {"status": "finished", "top1": top1, "seed": i, "protocol": protocol}))
    records, _ = load_runs([tmp_path])
    rows = sorted({(r.row, r.top1) for r in records})
    assert rows == [("nulsq_a", 70.0), ("nulsq_a", 72.0), ("nulsq_a [bf16]", 60.0)]
    paper = {"bits": [2], "labels": {"nulsq_a": "nuLSQ-A"},
             "rows": {"preresnet18": {"nulsq_a": {2: 67.9}}}}
    text = render_table("D", paper, aggregate(records), records)
    # fp32 runs average together; the bf16 run is its own row, still beside the published 67.9
    assert "| nuLSQ-A | 71.00 ± 1.41 (n=2) | 72.00 | 67.9 | +3.10 |" in text
    assert "| nuLSQ-A [bf16] | 60.00 (n=1) | 60.00 | 67.9 | -7.90 |" in text


def test_summary_records_the_protocol_a_run_used(tiny_run, one_thread):
    from nulsq.train import run

    overrides = tiny_run("pretrain.epochs=0", "trainer.epochs=1", "trainer.max_steps=1",
                         "init.protocol=fp_eval", "quantizer.grad_scale=authors")
    summary = run(compose_config(overrides))
    out = compose_config(overrides).trainer.output_dir
    assert json.loads((Path(out) / "summary.json").read_text())["protocol"] == summary["protocol"] == {
        "init_protocol": "fp_eval", "init_method": "mse", "init_reduce": "max", "grad_scale": "authors",
        "first_last": "dynamic8", "precision": "fp32"}
    events = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    assert next(e for e in events if e["event"] == "init")["protocol"] == "fp_eval"
