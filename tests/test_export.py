"""The exporter, its integer-only runtime and the ONNX export, against the fake-quantized model."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from nulsq.errors import UserError
from nulsq.export import format as fmt
from nulsq.export.exporter import export_model, export_run, quantized_layers
from nulsq.export.levels import activation_table, decision_thresholds, weight_table
from nulsq.export.pack import pack_codes, packed_size, unpack_codes
from nulsq.export.runtime import load_runtime
from nulsq.quant import QUANTIZERS, initialize_quantizers
from nulsq.quant.base import Quantizer
from nulsq.train.build import build_model

from conftest import ROOT, compose_config

KINDS = ["lsq", "nulsq_a", "nulsq_w", "nulsq_wa", "lcq", "lcq_apot_type", "pact", "apot", "dorefa",
         "lqnets"]
IMAGE = 8  # preresnet20's smallest input is 4; 8 keeps every stage's maps above 1x1
# (method, bits, quantizer.first_last): every kind at 2 bits with the authors' 8-bit dynamic
# first/last layers, plus wider grids (APoT/LCQ weights beyond ternary) and the other policies.
EXACT_TABLES = ("lsq", "nulsq_a", "nulsq_w", "nulsq_wa")  # outputs are exactly their level tables
CASES = [(method, 2, "dynamic8") for method in KINDS] + [
    ("apot", 3, "dynamic8"), ("lcq", 3, "dynamic8"), ("nulsq_wa", 4, "dynamic8"), ("lqnets", 3, "dynamic8"),
    ("lsq", 2, "fp"), ("nulsq_wa", 3, "same"), ("pact", 4, "same")]


# -- packing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_pack_round_trips_every_code_at_every_width(bits, signed):
    code_min = -(2 ** (bits - 1)) if signed else 0
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(code_min, code_min + 2**bits, (3, 5, 7), generator=generator)
    codes.view(-1)[:2] = torch.tensor([code_min, code_min + 2**bits - 1])  # both ends
    packed = pack_codes(codes, bits, code_min)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(codes.numel(), bits)
    assert packed.numel() == -(-codes.numel() * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, code_min, codes.numel()).view(codes.shape), codes)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(torch.tensor([code_min - 1]), bits, code_min)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(packed[:-1], bits, code_min, codes.numel())


def test_pack_layout_is_a_little_endian_bit_stream():
    # codes 1, 2, 3 at 2 bits, unsigned: bits 10 01 11 -> byte 0b00_11_10_01 = 0x39
    assert pack_codes(torch.tensor([1, 2, 3]), 2, 0).tolist() == [0b00111001]
    # signed 3-bit codes -4 (offset 0) and 3 (offset 7): 000 111 -> 0b00111000
    assert pack_codes(torch.tensor([-4, 3]), 3, -4).tolist() == [0b00111000]


# -- levels and thresholds -------------------------------------------------------------------------
def make_quantizer(kind: str, bits: int, signed: bool, role: str, **args) -> Quantizer:
    return QUANTIZERS.get(kind)(bits=bits, signed=signed, role=role, **args).eval()


def test_lsq_thresholds_are_the_half_steps_with_ties_to_even():
    q = make_quantizer("lsq", 3, True, "act")
    with torch.no_grad():
        q.step.fill_(0.25)  # a power of two: every k + 1/2 step is exact, ties are real
    table = activation_table(q)
    half = (torch.arange(-4, 3, dtype=torch.float64) + 0.5) * 0.25
    # round-half-to-even: x = (k + 1/2) s goes to the even code, so the threshold (the first x of
    # the upper code) is the tie itself when k + 1 is even, and the next float above it when odd.
    up = torch.tensor([(k + 1) % 2 == 0 for k in range(-4, 3)])
    expected = torch.where(up, half.float(), torch.nextafter(half.float(), torch.tensor(1.0)))
    assert torch.equal(table.thresholds, expected)
    assert table.code_min == -4 and table.step == 0.25
    assert table.levels.tolist() == [k * 0.25 for k in range(-4, 4)]


def test_nulsq_thresholds_follow_eq5_from_float64_steps():
    q = make_quantizer("nulsq", 3, True, "act")
    pos, neg = torch.tensor([0.3, 0.1, 0.45]), torch.tensor([0.2, 0.05, 0.4, 0.15])
    with torch.no_grad():
        q.pos_steps.copy_(pos)
        q.neg_steps.copy_(neg)
    table = activation_table(q)
    # Eq. 5: between levels n-1 and n the threshold is c_n - s_n/2 (mirrored below zero).
    p64, n64 = pos.double(), neg.double()
    t_pos = torch.cumsum(p64, 0) - p64 / 2
    t_neg = -(torch.cumsum(n64, 0) - n64 / 2)
    reference = torch.cat([t_neg.flip(0), t_pos])
    torch.testing.assert_close(table.thresholds.double(), reference, rtol=1e-6, atol=0)
    zero = torch.zeros(1, dtype=torch.float64)
    levels = torch.cat([-torch.cumsum(n64, 0).flip(0), zero, torch.cumsum(p64, 0)])
    torch.testing.assert_close(table.levels.double(), levels, rtol=1e-6, atol=0)
    assert table.step is None and table.code_min == -4 and table.code_max == 3


@pytest.mark.parametrize("kind,args", [("lsq", {}), ("nulsq", {}), ("pact", {}), ("apot", {}),
                                       ("lcq", {"K": 4}), ("dorefa", {}), ("lqnets", {})])
@pytest.mark.parametrize("signed", [False, True])
def test_threshold_codes_equal_the_fake_quantizer_on_dense_inputs(kind, args, signed):
    torch.manual_seed(0)
    q = make_quantizer(kind, 3, signed, "act", **args)
    perturb(q)
    table = activation_table(q)
    x = torch.linspace(-3, 3, 20001)
    x = torch.cat([x, table.thresholds, torch.nextafter(table.thresholds, torch.tensor(-10.0))])
    with torch.no_grad():
        fake = q(x)
    index = torch.bucketize(x, table.thresholds, right=True)
    # the fake-quantized value is the level of the code the comparisons give (to float rounding)
    torch.testing.assert_close(table.levels[index], fake, rtol=1e-6, atol=1e-6)


def test_decision_thresholds_refuses_a_function_that_misses_its_levels():
    with pytest.raises(RuntimeError, match="do not span"):
        decision_thresholds(lambda x: torch.zeros_like(x), torch.tensor([0.0, 1.0]))


def test_weight_codes_are_the_fake_quantized_weights():
    torch.manual_seed(0)
    q = make_quantizer("nulsq", 2, True, "weight")
    with torch.no_grad():
        q.pos_steps.copy_(torch.tensor([0.3]))
        q.neg_steps.copy_(torch.tensor([0.1, 0.5]))
    w = torch.randn(4, 3, 3, 3) * 0.4
    table, codes = weight_table(q, w)
    assert table.levels.tolist() == pytest.approx([-0.6, -0.1, 0.0, 0.3])
    assert codes.shape == w.shape and codes.min() >= -2 and codes.max() <= 1
    torch.testing.assert_close(table.levels[codes + 2], q(w).detach())


# -- the runtime equals the fake-quantized model, for every quantizer kind -------------------------
def perturb(q: Quantizer) -> None:
    """Move a quantizer off its uniform initial grid, as training would (non-uniform levels)."""
    g = torch.Generator().manual_seed(sum(map(ord, q.kind)) + q.bits)
    with torch.no_grad():
        for name, p in q.named_parameters(recurse=False):
            if name in ("pos_steps", "neg_steps", "step", "alpha"):
                p.mul_(torch.empty_like(p).uniform_(0.6, 1.6, generator=g))
            elif name == "theta":
                p.copy_(torch.randn(p.shape, generator=g))
        if q.kind == "lqnets":
            q.basis.mul_(torch.empty_like(q.basis).uniform_(0.7, 1.3, generator=g))


def tiny_quantized_model(method: str, bits: int = 2, first_last: str = "dynamic8"):
    """A preresnet20 on 8x8 inputs converted by configs/quantizer/<method>.yaml, initialised on
    random images, its quantizers perturbed off their initial grids."""
    cfg = compose_config(["dataset=synthetic", f"dataset.image_size={IMAGE}", f"quantizer={method}",
                          f"quantizer.bits={bits}", f"quantizer.first_last={first_last}",
                          "model.pretrained=false"])
    torch.manual_seed(0)
    model, _ = build_model(cfg, num_classes=10, quantized=True, verbose=False, load_pretrained=False,
                           image_size=IMAGE)
    images = [(torch.randn(8, 3, IMAGE, IMAGE), None) for _ in range(2)]
    initialize_quantizers(model, images, 2)
    for q in model.modules():
        if isinstance(q, Quantizer):
            perturb(q)
    if method == "lqnets":  # one training forward fits the bases by QEM
        with torch.no_grad():
            model.train()(images[0][0])
    return model.eval(), cfg


def capture_layers(model, x):
    """(input, output) of every quantized layer on input x."""
    seen = {}
    def record(name):
        return lambda module, args, out: seen.__setitem__(name, (args[0], out))

    hooks = [layer.register_forward_hook(record(name)) for name, layer in quantized_layers(model).items()]
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    return logits, seen


def runtime_flips(runtime, fake_layers: dict, x: torch.Tensor) -> tuple[torch.Tensor, set[int]]:
    """(runtime logits on x, the samples whose runtime pass gave some activation another code than
    the fake-quant model's input to that layer would). Each such difference is checked to be a
    float-rounding tie: the fake model's value lies within 1e-5 (relative) of a threshold, so the
    accumulations' last-bit differences decide it."""
    seen = {}
    hooks = [runtime.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: seen.__setitem__(n, args[0])) for n in fake_layers]
    with torch.no_grad():
        logits = runtime(x)
    for h in hooks:
        h.remove()
    flipped: set[int] = set()
    for name, (fake_in, _) in fake_layers.items():
        act = runtime.get_submodule(name).act
        if act is None:
            continue
        (mine, _), (theirs, scale) = act.encode(seen[name]), act.encode(fake_in)
        for where in (mine != theirs).nonzero().tolist():
            value = fake_in[tuple(where)] / (1.0 if scale is None else scale)
            gap = (act.thresholds - value).abs().min()
            assert gap <= 1e-5 * act.thresholds.abs().max(), f"{name}: {float(gap)} from a threshold"
            flipped.add(where[0])
    return logits, flipped


@pytest.mark.parametrize("method,bits,first_last", CASES)
def test_runtime_equals_the_fake_quantized_model(method, bits, first_last, tmp_path, one_thread):
    model, cfg = tiny_quantized_model(method, bits, first_last)
    manifest = export_model(model, cfg, {"num_classes": 10, "image_size": IMAGE}, tmp_path / "exp")
    runtime = load_runtime(tmp_path / "exp")
    assert all(not isinstance(m, Quantizer) for m in runtime.modules())  # no fake-quant op left
    x = torch.randn(64, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))
    logits, layers = capture_layers(model, x)
    for name, (inp, out) in layers.items():
        integer = runtime.get_submodule(name)
        with torch.no_grad():
            mine = integer(inp)
            if integer.act is not None:  # the codes are the fake quantizer's, value for value
                operand, factor = integer.act.operand(*integer.act.encode(inp))
                fake_act = model.get_submodule(name).act_quant(inp)
                torch.testing.assert_close(operand * factor, fake_act, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine, out, rtol=1e-4, atol=1e-5 * float(out.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    runtime_logits, flipped = runtime_flips(runtime, layers, x)
    assert len(flipped) <= 2, flipped  # float rounding puts at most a rare value across a threshold
    same = torch.ones(len(x), dtype=torch.bool)
    same[list(flipped)] = False
    torch.testing.assert_close(runtime_logits[same], logits[same], rtol=1e-4, atol=1e-5)
    assert torch.equal(runtime_logits[same].argmax(1), logits[same].argmax(1))
    # mode "float" runs the fake-quant layers' own float ops on the looked-up level values:
    # bit for bit the fake-quant model where the quantizers output exactly their tables
    dequantized = load_runtime(tmp_path / "exp", mode="float")
    with torch.no_grad():
        float_logits = dequantized(x)
    if method in EXACT_TABLES:
        assert torch.equal(float_logits, logits)
    else:  # the rivals' straight-through forms x + (q - x) are ulps away from their tables
        _, flipped = runtime_flips(dequantized, layers, x)
        assert len(flipped) <= 2, flipped
    if (bits, first_last) != (2, "dynamic8"):
        return
    # uniform grids take the integer path, learned non-uniform ones the level lookup
    middle = manifest["layers"][1:-1]
    ternary = ("lcq", "lcq_apot_type", "apot")  # 2-bit weights {-s, 0, s}: uniform
    assert {e["weight"]["uniform"] for e in middle} == {method in ("lsq", "nulsq_a", *ternary)}
    assert {e["act"]["uniform"] for e in middle} == {method in ("lsq", "nulsq_w", "pact", "dorefa")}


def test_manifest_sizes_and_schema(tmp_path):
    model, cfg = tiny_quantized_model("nulsq_wa")
    manifest = export_model(model, cfg, {"num_classes": 10, "image_size": IMAGE}, tmp_path / "exp")
    written = json.loads((tmp_path / "exp" / fmt.MANIFEST).read_text())
    assert written == json.loads(json.dumps(manifest))
    assert written["format"] == fmt.FORMAT and written["model"]["name"] == "preresnet20"
    layers = written["layers"]
    assert [e["name"] for e in layers] == list(quantized_layers(model))
    first, middle = layers[0], layers[1]
    assert first["weight"]["kind"] == first["act"]["kind"] == "dynamic_max" and first["act"]["dynamic"]
    assert first["act"]["signed"] and first["weight"]["bits"] == 8
    assert middle["weight"]["kind"] == "nulsq" and middle["weight"]["code_min"] == -2
    assert len(middle["weight"]["levels"]) == 4 and len(middle["act"]["thresholds"]) == 3
    sizes = written["sizes"]
    weights = sum(torch.Size(e["weight_shape"]).numel() for e in layers)
    bits = sum(torch.Size(e["weight_shape"]).numel() * e["weight"]["bits"] for e in layers)
    assert sizes["quantized_weights_fp32_bytes"] == 4 * weights
    packed = sum(-(-torch.Size(e["weight_shape"]).numel() * e["weight"]["bits"] // 8) for e in layers)
    assert sizes["packed_weight_bytes"] == packed >= bits // 8
    fp_params = sum(4 * t.numel() for k, t in model.state_dict().items()
                    if t.is_floating_point() and "_quant." not in k)
    assert sizes["fp32_bytes"] == fp_params
    assert sizes["total_bytes"] == sizes["packed_weight_bytes"] + sizes["float_bytes"] + sizes["table_bytes"]
    assert sizes["ratio"] == pytest.approx(sizes["fp32_bytes"] / sizes["total_bytes"])
    assert sizes["file_bytes"] == (tmp_path / "exp" / fmt.TENSORS).stat().st_size


# -- the CLI on a real trained run, and the bad inputs ---------------------------------------------
export_script = None


def load_export_script():
    global export_script
    if export_script is None:
        spec = importlib.util.spec_from_file_location("script_export", ROOT / "scripts" / "export.py")
        export_script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(export_script)
    return export_script


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished nuLSQ-WA run of the real CLI: 1 QAT epoch of preresnet20 on tiny synthetic data."""
    out = tmp_path_factory.mktemp("run") / "run"
    subprocess.run(
        [sys.executable, "train.py", "dataset=synthetic", "dataset.num_train=64", "dataset.num_val=48",
         "dataset.batch_size=16", f"dataset.image_size={IMAGE}", "trainer.device=cpu", "init.batches=2",
         "pretrain.epochs=0", "trainer.epochs=1", "logger=none", "quantizer=nulsq_wa",
         "optim.quant.lr=0.01", "quantizer.step_guard=clamp", "schedule.warmup_epochs=0",
         f"trainer.output_dir={out}"],
        cwd=ROOT, check=True, capture_output=True, env={**_env(), "OMP_NUM_THREADS": "1"})
    return out


def _env():
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}


@pytest.mark.slow
def test_export_cli_and_runtime_top1_on_a_trained_run(trained_run, tmp_path, capsys, one_thread):
    from nulsq.data import build as build_data
    from nulsq.export.exporter import load_trained

    script = load_export_script()
    out = tmp_path / "export"
    assert script.main([str(trained_run), "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "packed weights" in printed and "ratio" in printed and str(out) in printed
    top1 = json.loads((trained_run / "summary.json").read_text())["top1"]
    # Float mode computes every layer as the fake-quant layer does: predictions equal exactly.
    assert (f"verify (float runtime): fake-quant top-1 {top1:.2f}%, runtime top-1 {top1:.2f}%, "
            f"predictions agree on 48/48 images") in printed
    # Integer mode sums codes and scales once: an activation within an ulp of a 2-bit threshold
    # may take the next code (the authors' 8-bit first layer scales by m/Qp after the sum, the
    # fake-quant layer before it), so one prediction in 48 may differ, and top-1 by that one.
    line = next(t for t in printed.splitlines() if "verify (integer runtime)" in t)
    agree = int(line.split("agree on ")[1].split("/")[0])
    runtime_top1 = float(line.split("runtime top-1 ")[1].split("%")[0])
    assert f"fake-quant top-1 {top1:.2f}%" in line and agree >= 47
    assert abs(runtime_top1 - top1) <= 100 * (48 - agree) / 48 + 0.01
    model, cfg, _ = load_trained(trained_run)
    runtime, integer = load_runtime(out, mode="float"), load_runtime(out)
    data = build_data(cfg.dataset, torch.device("cpu"), int(cfg.trainer.seed))
    agree = agree_int = total = correct_fake = correct_float = 0
    with torch.no_grad():
        for images, labels in data.val:
            fake, mine = model(images).argmax(1), runtime(images).argmax(1)
            agree += int((fake == mine).sum())
            agree_int += int((fake == integer(images).argmax(1)).sum())
            correct_fake += int((fake == labels).sum())
            correct_float += int((mine == labels).sum())
            total += labels.numel()
    assert total == 48 and agree == total and correct_float == correct_fake
    assert agree_int >= total - 1
    summary = json.loads((trained_run / "summary.json").read_text())
    assert 100 * correct_fake / total == pytest.approx(summary["top1"])  # the run's own eval top-1


@pytest.mark.slow
def test_export_cli_bad_inputs_fail_in_one_line(trained_run, tmp_path, capsys):
    script = load_export_script()

    def fails(argv, *words):
        assert script.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        for word in words:
            assert word in err, err

    # a full-precision run
    fp = tmp_path / "fp"
    shutil.copytree(trained_run, fp)
    cfg = OmegaConf.load(fp / "config.yaml")
    cfg.quantizer.name, cfg.quantizer.weight, cfg.quantizer.act = "fp", None, None
    OmegaConf.save(cfg, fp / "config.yaml")
    ckpt = torch.load(fp / "checkpoints" / "last.pt", weights_only=True)  # the config export reads
    torch.save({**ckpt, "config": OmegaConf.to_yaml(cfg)}, fp / "checkpoints" / "last.pt")
    fails([fp, "--out", tmp_path / "o1"], "full-precision")
    # an unfinished run
    running = tmp_path / "running"
    shutil.copytree(trained_run, running)
    summary = json.loads((running / "summary.json").read_text())
    (running / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    fails([running, "--out", tmp_path / "o2"], "not a finished run", "trainer.resume=auto")
    fails([tmp_path / "absent", "--out", tmp_path / "o3"], "does not exist")
    # a non-empty output folder without --force, then with it
    out = tmp_path / "o4"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails([trained_run, "--out", out], "not empty", "--force")
    assert script.main([str(trained_run), "--out", str(out), "--force"]) == 0
    assert (out / "notes.txt").read_text() == "mine"  # --force replaces the export files only
    load_runtime(out)
    # corrupt exports, refused when loading
    data = bytearray((out / fmt.TENSORS).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (out / fmt.TENSORS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="SHA-256"):
        load_runtime(out)
    (out / fmt.MANIFEST).write_text('{"format": "nulsq-exp')
    with pytest.raises(UserError, match="corrupt"):
        load_runtime(out)
    (out / fmt.MANIFEST).unlink()
    with pytest.raises(UserError, match="not a nulsq export"):
        load_runtime(out)


def test_corrupt_tensors_behind_a_matching_checksum_are_refused(tmp_path):
    """A tensors file rewritten with its manifest's checksum updated (a broken exporter) still
    fails on its content: truncated codes, a missing table."""
    from safetensors.torch import load, save

    model, cfg = tiny_quantized_model("lsq")
    export_model(model, cfg, {"num_classes": 10, "image_size": IMAGE}, tmp_path)
    tensors = load((tmp_path / fmt.TENSORS).read_bytes())
    name = next(iter(quantized_layers(model)))

    def rewrite(changed):
        data = save(changed)
        (tmp_path / fmt.TENSORS).write_bytes(data)
        manifest = json.loads((tmp_path / fmt.MANIFEST).read_text())
        (tmp_path / fmt.MANIFEST).write_text(json.dumps({**manifest, "tensors_sha256": fmt.sha256(data)}))

    rewrite({**tensors, f"{name}.weight.codes": tensors[f"{name}.weight.codes"][:-1].clone()})
    with pytest.raises(UserError, match="weight codes are corrupt"):
        load_runtime(tmp_path)
    rewrite({k: v for k, v in tensors.items() if k != f"{name}.act.thresholds"})
    with pytest.raises(UserError, match="has no tensor"):
        load_runtime(tmp_path)


def test_export_run_refuses_a_checkpoint_that_is_not_a_training_checkpoint(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(compose_config(["dataset=synthetic", "quantizer=lsq"]), run / "config.yaml")
    (run / "summary.json").write_text('{"status": "finished"}')
    (run / "checkpoints" / "last.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="corrupt or not a torch file"):
        export_run(run, tmp_path / "out")
    torch.save({"model": {}}, run / "checkpoints" / "last.pt")
    with pytest.raises(UserError, match="not a nulsq training checkpoint"):
        export_run(run, tmp_path / "out")


def fake_run(folder, cfg, model, stage="qat", status="finished", stored_config=True):
    """A run directory as train.py leaves one (config.yaml, summary.json, checkpoints/last.pt),
    written in milliseconds; `stored_config=False`: a checkpoint without its own config copy."""
    from nulsq.train.checkpoint import save_checkpoint

    (folder / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    (folder / "summary.json").write_text(json.dumps({"status": status, "top1": 12.5}))
    fields = {"model": model.state_dict(), "fingerprint": "f", "stage": stage, "num_classes": 10,
              "image_size": IMAGE}
    save_checkpoint(folder / "checkpoints" / "last.pt", fields, cfg)
    if not stored_config:
        ckpt = torch.load(folder / "checkpoints" / "last.pt", weights_only=True)
        torch.save({k: v for k, v in ckpt.items() if k != "config"}, folder / "checkpoints" / "last.pt")
    return folder


def test_an_exported_run_uses_the_config_its_checkpoint_was_trained_with(tmp_path):
    from nulsq.export.exporter import load_trained

    model, cfg = tiny_quantized_model("nulsq_wa")
    run = fake_run(tmp_path / "run", cfg, model)
    edited = OmegaConf.load(run / "config.yaml")
    edited.quantizer.bits = 3  # config.yaml edited after training: the checkpoint's copy wins
    OmegaConf.save(edited, run / "config.yaml")
    loaded, loaded_cfg, info = load_trained(run)
    assert loaded_cfg.quantizer.bits == 2 and info["top1"] == 12.5
    x = torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    # a checkpoint without its own copy (format 1): its run's config.yaml
    old = fake_run(tmp_path / "old", cfg, model, stored_config=False)
    assert load_trained(old / "checkpoints" / "last.pt")[1].quantizer.bits == 2


def test_load_trained_refusals_are_one_line(tmp_path):
    from nulsq.export.exporter import load_trained

    model, cfg = tiny_quantized_model("lsq")
    fp_cfg = compose_config(["dataset=synthetic", f"dataset.image_size={IMAGE}", "quantizer=fp",
                             "model.pretrained=false"])
    loose = fake_run(tmp_path / "loose", cfg, model, stored_config=False) / "checkpoints" / "last.pt"
    loose = loose.rename(tmp_path / "loose.pt")
    cases = [(fake_run(tmp_path / "fp", fp_cfg, model, stage="fp"), "is a full-precision run"),
             (fake_run(tmp_path / "running", cfg, model, status="running"), "not a finished run"),
             (fake_run(tmp_path / "fp_stage", cfg, model, stage="fp"), "checkpoint of the full-precision"),
             (loose, "holds no config")]
    for source, words in cases:
        with pytest.raises(UserError, match=words) as err:
            load_trained(source)
        assert "\n" not in str(err.value), err.value


# -- ONNX ------------------------------------------------------------------------------------------
ONNX_CASES = CASES[:len(KINDS)] + [("lsq", 2, "fp"), ("nulsq_wa", 3, "same"), ("apot", 3, "dynamic8"),
                                   ("nulsq_a", 2, "dynamic8_absmax")]


@pytest.mark.parametrize("method,bits,first_last", ONNX_CASES)
def test_onnxruntime_matches_the_pytorch_eval(method, bits, first_last, tmp_path, one_thread):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    import onnx

    from nulsq.export.onnx import export_onnx

    model, cfg = tiny_quantized_model(method, bits, first_last)
    export_model(model, cfg, {"num_classes": 10, "image_size": IMAGE}, tmp_path)
    path = export_onnx(tmp_path)
    graph = onnx.load(str(path)).graph
    ops = {node.op_type for node in graph.node}
    if first_last == "dynamic8":  # the authors' 8-bit layers: x / max(x) * Qp, Round, unclamped
        assert {"ReduceMax", "Round"} <= ops
    if first_last == "dynamic8_absmax" or method == "lsq":  # QDQ: absmax 8-bit layers, LSQ layers
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    if method.startswith("nulsq") or method in ("lcq", "apot", "lqnets"):  # level tables
        assert {"GreaterOrEqual", "ReduceSum", "Gather"} <= ops
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)  # standard operators only
    # weights are stored as int8 codes (identical code tensors may be shared), not as floats
    shapes = {tuple(m.weight.shape) for m in quantized_layers(model).values()}
    int8 = [tuple(i.dims) for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8 and set(int8) <= shapes
    floats = sum(torch.Size(i.dims).numel() for i in graph.initializer
                 if i.data_type == onnx.TensorProto.FLOAT)
    assert floats < sum(torch.Size(s).numel() for s in shapes) // 4
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(16, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_wide_8bit_layer_accumulates_integer_codes_exactly():
    """8-bit codes over a fan-in of 2048: the worst-case sum exceeds fp32's 24 bits, so the runtime
    accumulates in fp64 and matches the exact integer product (the fake-quant fp32 layer does not)."""
    from torch import nn

    from nulsq.export.exporter import build_export
    from nulsq.export.runtime import IntegerLayer
    from nulsq.quant import quantize_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2048, 3))
    lsq = {"kind": "lsq", "args": {}}
    qcfg = OmegaConf.create({"weight": lsq, "act": lsq, "bits": 8, "first_last": "same",
                             "signed_act": True, "grad_scale": "none"})
    quantize_model(net, qcfg, verbose=False)
    initialize_quantizers(net, [(torch.randn(16, 2048), None)], 1)
    with torch.no_grad():  # weight codes up to 127: the worst case needs 2^25 > 2^24
        net[0].weight_quant.step.copy_(net[0].weight.abs().max() / 127)
    layers, tensors, _ = build_export(net)
    layer = IntegerLayer(layers[0], tensors, net[0])
    assert layer._accumulation_dtype() == torch.float64
    x = torch.randn(5, 2048) * 3
    s_a, s_w = net[0].act_quant.step.double(), net[0].weight_quant.step.double()
    codes_x = torch.round(torch.clamp(x.double() / s_a, -128, 127))
    codes_w = torch.round(torch.clamp(net[0].weight.detach().double() / s_w, -128, 127))
    # the exact integer sum (< 2^53 in fp64), scaled once, rounded to fp32, plus the fp32 bias
    exact = ((codes_x @ codes_w.T) * (s_a * s_w)).float() + net[0].bias.detach()
    with torch.no_grad():
        assert torch.equal(layer(x), exact)
