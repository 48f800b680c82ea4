"""quantize_model on every registered model; first/last policy; init; guards; progressive merge."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from nulsq.errors import UserError
from nulsq.models import MODELS, build
from nulsq.quant import initialize_quantizers, quantize_model, quantizer_parameters, quantizers
from nulsq.quant.convert import QuantConv2d, QuantLinear
from nulsq.quant.progressive import load_progressive
from nulsq.quant.quantizers import LSQQuantizer, NuLSQQuantizer
from nulsq.train.guards import StepSizeError, check_step_sizes, clamp_step_sizes


def qcfg(name="nulsq_a", bits=2, weight="lsq", act="nulsq", **kw):
    role = lambda kind: None if kind is None else {"kind": kind, "args": {}}  # noqa: E731
    base = {"name": name, "bits": bits, "weight": role(weight),
            "act": role(act), "grad_scale": "none", "first_last": "dynamic8",
            "signed_act": None, "step_guard": "stop", "step_floor": 1e-6}
    base.update(kw)
    return OmegaConf.create(base)


def small_side(spec) -> int:
    return max(spec.min_input_size, 16)


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_converts_initialises_and_trains_a_step(name, capsys):
    spec = MODELS.get(name)
    side = small_side(spec)
    model = build({"name": name, "pretrained": False, "input_size": side}, 10)
    n_layers = sum(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    plans = quantize_model(model, qcfg(), spec.signed_activations, "mse")
    assert len(plans) == n_layers
    assert "layer" in capsys.readouterr().out  # the printed table
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules())
    assert plans[0].weight.startswith("dynamic_max 8b") and plans[-1].act.startswith("dynamic_max 8b")
    assert plans[0].act == "dynamic_max 8b signed"  # the image is signed
    middle_act = "nulsq 2b signed" if spec.signed_activations else "nulsq 2b unsigned"
    assert {p.act for p in plans[1:-1]} == {middle_act}
    assert {p.weight for p in plans[1:-1]} == {"lsq 2b signed"}

    x = torch.randn(2, 3, side, side)
    initialize_quantizers(model, [(x, None)], 1)
    for q in quantizers(model).values():
        if q.step_sizes() is not None:
            assert torch.all(q.step_sizes() > 0)
    model.train()
    model(x).sum().backward()
    params = quantizer_parameters(model)
    assert params and all(p.grad is not None for p in params)


def test_first_last_fp_and_same_policies():
    for policy, first_kind in (("fp", None), ("same", "nulsq")):
        model = build({"name": "preresnet20", "pretrained": False}, 10)
        quantize_model(model, qcfg(first_last=policy), False, "lsq", verbose=False)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if first_kind is None:
            assert type(convs[0]) is nn.Conv2d and type(linears[-1]) is nn.Linear
        else:
            assert isinstance(convs[0], QuantConv2d) and isinstance(linears[-1], QuantLinear)
            assert convs[0].act_quant.kind == "nulsq" and convs[0].act_quant.signed
            assert convs[0].act_quant.bits == 2


def test_unknown_kind_and_policy_fail_clearly():
    model = build({"name": "preresnet20", "pretrained": False}, 10)
    with pytest.raises(UserError, match="unknown quantizer kind 'nulsqq'.*valid names"):
        quantize_model(model, qcfg(act="nulsqq"), False, verbose=False)
    with pytest.raises(UserError, match="first_last"):
        quantize_model(model, qcfg(first_last="both"), False, verbose=False)


def test_fp_quantizer_leaves_model_alone():
    model = build({"name": "preresnet20", "pretrained": False}, 10)
    assert quantize_model(model, qcfg(weight=None, act=None), False) == []
    assert not quantizers(model)


def test_init_keeps_the_maximum_over_batches():
    q = LSQQuantizer(bits=2, signed=False, role="act", init_method="lsq")
    q.begin_init()
    small, large = torch.full((4, 8), 0.5), torch.full((4, 8), 2.0)
    q(small), q(large), q(small)
    q.end_init()
    # LSQ init 2 mean|x| / sqrt(Qp) of the larger batch: 2 * 2 / sqrt(3)
    assert q.step.item() == pytest.approx(4 / 3**0.5)
    nu = NuLSQQuantizer(bits=2, signed=True, role="weight", init_method="lsq")
    nu.begin_init()
    nu(large)
    nu.end_init()
    expected = 2 * 2.0 / 1**0.5  # signed 2-bit: Qp = 1
    assert torch.allclose(nu.pos_steps, torch.full((1,), expected))
    assert torch.allclose(nu.neg_steps, torch.full((2,), expected))  # a uniform grid to start


def test_step_guard_names_the_layer_and_clamp_repairs():
    model = build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(model, qcfg(), False, "lsq", verbose=False)
    initialize_quantizers(model, [(torch.randn(2, 3, 32, 32), None)], 1)
    check_step_sizes(model)  # all fine
    name, q = next((n, q) for n, q in quantizers(model).items() if isinstance(q, NuLSQQuantizer))
    with torch.no_grad():
        q.pos_steps[1] = -0.1
    with pytest.raises(StepSizeError, match=name.replace(".", r"\.")):
        check_step_sizes(model)
    with torch.no_grad():
        q.pos_steps[0] = float("nan")
    clamp_step_sizes(model, 1e-3)
    assert torch.all(q.pos_steps >= 1e-3)
    check_step_sizes(model)


def test_progressive_merge_from_a_higher_bit_run(tmp_path):
    torch.manual_seed(0)
    old = build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(old, qcfg(bits=3, weight="nulsq"), False, "lsq", verbose=False)
    with torch.no_grad():
        for q in quantizers(old).values():
            for p in q.step_parameters():
                p.copy_(torch.rand_like(p) + 0.1)
    ckpt = tmp_path / "run3" / "checkpoints" / "last.pt"
    ckpt.parent.mkdir(parents=True)
    torch.save({"model": old.state_dict()}, ckpt)

    new = build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(new, qcfg(bits=2, weight="nulsq"), False, "lsq", verbose=False)
    assert load_progressive(new, tmp_path / "run3") == ckpt
    old_q, new_q = quantizers(old), quantizers(new)
    for name, q in new_q.items():
        if not isinstance(q, NuLSQQuantizer):
            continue
        # every second old level on each side of zero survives: c_2, c_4, ... and -c'_2, -c'_4, ...
        old_pos = torch.cumsum(old_q[name].pos_steps.detach(), 0)
        assert torch.allclose(torch.cumsum(q.pos_steps.detach(), 0), old_pos[1::2][: q.qp]), name
        if q.neg_steps is not None:
            old_neg = torch.cumsum(old_q[name].neg_steps.detach(), 0)
            assert torch.allclose(torch.cumsum(q.neg_steps.detach(), 0), old_neg[1::2][: q.qn]), name
    for key, value in new.state_dict().items():
        if "quant" not in key:
            assert torch.equal(value, old.state_dict()[key]), key


def test_progressive_lsq_step_doubles(tmp_path):
    old = build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(old, qcfg(bits=3), False, "lsq", verbose=False)
    with torch.no_grad():
        for q in quantizers(old).values():
            if isinstance(q, LSQQuantizer):
                q.step.fill_(0.3)
    torch.save({"model": old.state_dict()}, tmp_path / "old.pt")
    new = build({"name": "preresnet20", "pretrained": False}, 10)
    quantize_model(new, qcfg(bits=2), False, "lsq", verbose=False)
    load_progressive(new, tmp_path / "old.pt")
    steps = [q.step.item() for q in quantizers(new).values() if isinstance(q, LSQQuantizer)]
    assert steps and all(s == pytest.approx(0.6) for s in steps)
    with pytest.raises(UserError, match="init.from_run"):
        load_progressive(new, tmp_path / "missing")
