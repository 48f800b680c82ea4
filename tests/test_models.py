"""Model registry and pretrained loading: every registered model builds and runs; weights files
load exactly, or fail with a one-line UserError naming the file; nothing touches the network."""

from __future__ import annotations

import logging
import socket
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from nulsq.errors import UserError
from nulsq.models import MODELS, ModelSpec, build

NUM_CLASSES = 7  # neither 10, 100 nor 1000, so every head has to follow the argument


@pytest.fixture(scope="module")
def built() -> dict[tuple[str, int], torch.nn.Module]:
    """One random-init build per (name, num_classes) for the whole module: the big ones are slow."""
    return {}


def get_model(
    cache: dict, name: str, num_classes: int = NUM_CLASSES, input_size: int | None = None
) -> torch.nn.Module:
    spec = MODELS.get(name)
    # Only a model whose constructor depends on the size (Swin) needs a build per size.
    size = input_size if input_size and spec.size_kwargs(input_size) else None
    key = (name, num_classes, size)
    if key not in cache:
        cfg = {"name": name, "pretrained": False, "input_size": size}
        cache[key] = build(cfg, num_classes)
    return cache[key]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def assert_same_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        assert torch.equal(state[key], value), key


def differing_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, shifted so that they differ from any fresh random init."""
    return {
        k: (v + 0.5 if v.is_floating_point() else v + 3) for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_runs_at_its_input_size(built, name: str) -> None:
    spec = MODELS.get(name)
    model = get_model(built, name).eval()
    batch = 1 if spec.input_size > 64 else 2
    with torch.no_grad():
        out = model(torch.randn(batch, 3, spec.input_size, spec.input_size))
    assert out.shape == (batch, NUM_CLASSES)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_trains_at_its_min_input_size(built, name: str) -> None:
    size = MODELS.get(name).min_input_size
    model = get_model(built, name, input_size=size).train()  # BatchNorm needs 2 values: batch 2
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, NUM_CLASSES)


@pytest.mark.parametrize("name", [n for n in MODELS.names() if MODELS.get(n).source == "pytorchcv"])
def test_pytorchcv_models_compute_what_the_library_does(built, name: str) -> None:
    """Global pooling instead of pytorchcv's fixed AvgPool2d changes nothing at the native size."""
    from pytorchcv.model_provider import get_model as library_model

    spec = MODELS.get(name)
    native_classes = 10 if spec.input_size == 32 else 1000
    reference = library_model(spec.arch_for(native_classes), pretrained=False).eval()
    ours = get_model(built, name, native_classes).eval()
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(1, 3, spec.input_size, spec.input_size)
    with torch.no_grad():
        want = reference(x)
        got = ours(x)
    # Only the summation order of the pooling differs: float32 rounding, relative to the logits.
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("name", MODELS.names())
def test_spec_fields_are_consistent(name: str) -> None:
    spec = MODELS.get(name)
    assert isinstance(spec, ModelSpec) and spec.name == name
    assert spec.source in {"timm", "pytorchcv"}
    assert spec.family in {"resnet", "mobilenet", "swin", "convnext"}
    assert spec.min_input_size <= spec.input_size
    # docs/fidelity.md B2: GELU/LayerNorm networks need a signed activation quantizer.
    assert spec.signed_activations == (name in {"swin_t", "convnext_t"})


def test_paper_architectures() -> None:
    arch = {name: MODELS.get(name).arch_for(10) for name in MODELS.names()}
    assert arch == {
        "preresnet20": "preresnet20_cifar10",
        "preresnet56": "preresnet56_cifar10",
        "preresnet18": "preresnet18",
        "preresnet34": "preresnet34",
        "resnet18": "resnet18",
        "mobilenetv2": "mobilenetv2_100",
        "swin_t": "swin_tiny_patch4_window7_224",
        "convnext_t": "convnext_tiny",
    }
    assert MODELS.get("preresnet20").arch_for(100) == "preresnet20_cifar100"
    assert MODELS.get("preresnet56").arch_for(100) == "preresnet56_cifar100"
    assert MODELS.get("preresnet20").arch_for(200) == "preresnet20_cifar10"


@pytest.mark.parametrize("num_classes", [10, 100, 3])
def test_num_classes_follows_the_argument(built, num_classes: int) -> None:
    model = get_model(built, "preresnet20", num_classes).eval()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, num_classes)


def test_swin_small_input_keeps_imagenet_shapes(built) -> None:
    """At 32 px Swin must still run and keep the 224 model's tensor shapes (so weights fit)."""
    small = get_model(built, "swin_t", input_size=32).eval()
    with torch.no_grad():
        assert small(torch.randn(1, 3, 32, 32)).shape == (1, NUM_CLASSES)
    full = get_model(built, "swin_t").state_dict()
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in full.items()}


def test_input_below_minimum_is_a_user_error() -> None:
    with pytest.raises(UserError, match="at least 32"):
        build({"name": "preresnet18", "pretrained": False, "input_size": 16}, 10)


def test_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(UserError, match="preresnet20") as err:
        build({"name": "resnet1000", "pretrained": False}, 10)
    assert "resnet1000" in str(err.value)


def test_bad_pretrained_value_is_a_user_error() -> None:
    with pytest.raises(UserError, match="model.pretrained"):
        build({"name": "preresnet20", "pretrained": 3}, 10)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": {f"module.{k}": v for k, v in sd.items()}},
        lambda sd: {"state_dict_ema": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    ],
    ids=["bare", "state_dict", "model+module", "ema+compile"],
)
def test_pretrained_path_round_trip(built, tmp_path: Path, wrap) -> None:
    reference = differing_state(get_model(built, "preresnet20", 10))
    path = tmp_path / "w.pth"
    torch.save(wrap(reference), path)
    cfg = OmegaConf.create({"name": "preresnet20", "pretrained": str(path), "input_size": None})
    assert_same_weights(build(cfg, 10), reference)


def test_pretrained_safetensors_file(built, tmp_path: Path) -> None:
    reference = differing_state(get_model(built, "preresnet20", 10))
    path = tmp_path / "w.safetensors"
    save_file(reference, str(path))
    assert_same_weights(build({"name": "preresnet20", "pretrained": str(path)}, 10), reference)


def test_head_reinitialised_when_num_classes_differs(built, tmp_path: Path, caplog) -> None:
    reference = differing_state(get_model(built, "preresnet20", 10))
    path = tmp_path / "cifar10.pth"
    torch.save(reference, path)
    with caplog.at_level(logging.WARNING):
        model = build({"name": "preresnet20", "pretrained": str(path)}, NUM_CLASSES)
    state = model.state_dict()
    assert state["output.weight"].shape == (NUM_CLASSES, 64)
    assert state["output.bias"].shape == (NUM_CLASSES,)
    body = [k for k in reference if not k.startswith("output.")]
    assert len(body) == len(reference) - 2
    for key in body:
        assert torch.equal(state[key], reference[key]), key
    # The fresh head is PyTorch's Linear init, |w| <= 1/sqrt(64), not the shifted file values.
    assert state["output.weight"].abs().max() <= 64**-0.5
    assert any(str(path) in r.getMessage() and "10 classes" in r.getMessage() for r in caplog.records)


def test_wrong_architecture_file(built, tmp_path: Path) -> None:
    path = tmp_path / "preresnet20.pth"
    torch.save(get_model(built, "preresnet20", 10).state_dict(), path)
    with pytest.raises(UserError, match="preresnet56") as err:
        build({"name": "preresnet56", "pretrained": str(path)}, 10)
    assert str(path) in str(err.value) and "missing" in str(err.value)


def test_shape_mismatch_outside_the_head(built, tmp_path: Path) -> None:
    state = dict(get_model(built, "preresnet20", 10).state_dict())
    state["features.init_block.conv.weight"] = torch.zeros(16, 3, 5, 5)
    path = tmp_path / "bad_shape.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="features.init_block.conv.weight") as err:
        build({"name": "preresnet20", "pretrained": str(path)}, 10)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_unexpected_key(built, tmp_path: Path) -> None:
    state = dict(get_model(built, "preresnet20", 10).state_dict())
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="unexpected extra.weight"):
        build({"name": "preresnet20", "pretrained": str(path)}, 10)


@pytest.mark.parametrize(
    "content",
    [b"this is not a checkpoint", b"PK\x03\x04 truncated zip"],
    ids=["text", "truncated"],
)
def test_corrupt_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "corrupt.pth"
    path.write_bytes(content)
    with pytest.raises(UserError, match="cannot read") as err:
        build({"name": "preresnet20", "pretrained": str(path)}, 10)
    assert str(path) in str(err.value)


def test_file_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "config_only.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(UserError, match="no state dict") as err:
        build({"name": "preresnet20", "pretrained": str(path)}, 10)
    assert str(path) in str(err.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.pth"
    with pytest.raises(UserError, match="not found") as err:
        build({"name": "preresnet20", "pretrained": str(path)}, 10)
    assert str(path) in str(err.value)


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.mark.parametrize(
    "name, num_classes, expected_file",
    [
        # pytorchcv's file names: <arch>-<error x 100 as 4 digits>-<sha1[:8]>.pth
        ("preresnet20", 10, "preresnet20_cifar10-0651-76cec68d.pth"),
        ("preresnet20", 100, "preresnet20_cifar100-3022-3dbfa6a2.pth"),
        ("preresnet18", 1000, "preresnet18-0972-5651bc2d.pth"),
        ("resnet18", 1000, "model.safetensors"),
        ("mobilenetv2", 1000, "model.safetensors"),
    ],
)
def test_pretrained_true_with_empty_cache(
    empty_hf_cache: Path, name: str, num_classes: int, expected_file: str
) -> None:
    cfg = {"name": name, "pretrained": True, "cache_dir": str(empty_hf_cache)}
    with pytest.raises(UserError, match="model.pretrained=/path/to/file") as err:
        build(cfg, num_classes)
    message = str(err.value)
    assert expected_file in message and str(empty_hf_cache) in message and "\n" not in message


def test_pretrained_true_finds_pytorchcv_cache(built, tmp_path: Path) -> None:
    reference = differing_state(get_model(built, "preresnet20", 10))
    torch.save(reference, tmp_path / "preresnet20_cifar10-0651-76cec68d.pth")
    model = build({"name": "preresnet20", "pretrained": True, "cache_dir": str(tmp_path)}, 10)
    assert_same_weights(model, reference)


def test_pretrained_true_finds_hf_cache(built, empty_hf_cache: Path) -> None:
    """A hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/file."""
    model = get_model(built, "resnet18", 1000)
    repo_id = model.pretrained_cfg["hf_hub_id"]
    assert repo_id.startswith("timm/resnet18")
    repo_dir = empty_hf_cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    reference = differing_state(model)
    save_file(reference, str(repo_dir / "snapshots" / commit / "model.safetensors"))
    cfg = {"name": "resnet18", "pretrained": True, "cache_dir": str(empty_hf_cache)}
    assert_same_weights(build(cfg, 1000), reference)
