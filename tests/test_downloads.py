"""Downloads through each library's own code, against a local server on 127.0.0.1.

pytorchcv's downloader (zip, sha1 from its model table), huggingface_hub's `hf_hub_download` (as
timm calls it) and torchvision's CIFAR download all run for real; the server stands in for the
internet, serving a generated file, a truncated one, a corrupt one or a 404. Each test checks what
is left in the cache: the verified file, atomically in place, or nothing at all.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from nulsq.errors import UserError
from nulsq.models import build
from nulsq.models.fetch import PYTORCHCV_URL_ENV

from local_server import Route, closed_port_url, local_server

PYTORCHCV_ARCH = "preresnet20_cifar10"
RELEASE = "v0.0.1"


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads on, and no proxy between the clients and 127.0.0.1."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server():
    with local_server() as srv:
        yield srv


def shifted_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, shifted so that they differ from any fresh random init."""
    return {k: (v + 0.5 if v.is_floating_point() else v + 3) for k, v in model.state_dict().items()}


def assert_weights(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


# -- pytorchcv ---------------------------------------------------------------------------------


@pytest.fixture
def pytorchcv_release(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A generated preresnet20_cifar10 weights file published as pytorchcv publishes its own:
    `<arch>-<error>-<sha1[:8]>.pth` zipped under releases/download/<tag>/, the full sha1 in
    pytorchcv's model table (patched here to the generated file's)."""
    from pytorchcv.models.common import model_store

    reference = shifted_state(build({"name": "preresnet20", "pretrained": False}, 10))
    buffer = io.BytesIO()
    torch.save(reference, buffer)
    weights = buffer.getvalue()
    sha1 = hashlib.sha1(weights).hexdigest()
    file_name = f"{PYTORCHCV_ARCH}-0651-{sha1[:8]}.pth"
    table = model_store.get_model_name_suffix_data

    def patched_table(arch: str):
        return ("0651", sha1, RELEASE) if arch == PYTORCHCV_ARCH else table(arch)

    monkeypatch.setattr(model_store, "get_model_name_suffix_data", patched_table)
    monkeypatch.setenv(PYTORCHCV_URL_ENV, f"{server.url}/osmr/imgclsmob")
    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr(file_name, weights)
    path = f"/osmr/imgclsmob/releases/download/{RELEASE}/{file_name}.zip"
    return {"reference": reference, "file_name": file_name, "zip": zipped.getvalue(), "path": path,
            "cache": tmp_path / "torch_models"}


def build_pytorchcv(release) -> torch.nn.Module:
    return build({"name": "preresnet20", "pretrained": True, "cache_dir": str(release["cache"])}, 10)


def test_pytorchcv_weights_download_once_then_come_from_the_cache(server, pytorchcv_release, capfd):
    release = pytorchcv_release
    server.routes[release["path"]] = Route(release["zip"])
    assert_weights(build_pytorchcv(release), release["reference"])
    assert server.requests == [("GET", release["path"])]
    # Only the unzipped, sha1-checked file is left: no zip, no staging folder.
    assert files_under(release["cache"]) == [release["file_name"]]
    assert list(release["cache"].iterdir()) == [release["cache"] / release["file_name"]]
    assert "Downloading" in capfd.readouterr().out  # pytorchcv's own announcement
    assert_weights(build_pytorchcv(release), release["reference"])
    assert len(server.requests) == 1  # the second run read the cache without a request


@pytest.mark.parametrize("fault", ["cut_off", "wrong_content", "missing"])
def test_a_failed_pytorchcv_download_leaves_nothing_and_says_what_to_do(
    server, pytorchcv_release, fault
):
    release = pytorchcv_release
    body = release["zip"]
    if fault == "cut_off":  # the connection drops halfway through the announced length
        server.routes[release["path"]] = Route(body[: len(body) // 2], declared=len(body))
    elif fault == "wrong_content":  # a complete zip whose file fails pytorchcv's sha1 check
        other = io.BytesIO()
        with zipfile.ZipFile(other, "w") as zf:
            zf.writestr(release["file_name"], b"not the published weights")
        server.routes[release["path"]] = Route(other.getvalue())
    with pytest.raises(UserError) as err:
        build_pytorchcv(release)
    message = str(err.value)
    assert "\n" not in message and message.startswith("could not download pytorchcv weights")
    assert release["file_name"] in message and str(release["cache"]) in message
    assert "curl -LO" in message and "model.pretrained=/path/to/file" in message
    assert server.count() >= 1
    assert files_under(release["cache"]) == []


def test_pytorchcv_offline_names_the_file_and_folder_without_a_request(
    server, pytorchcv_release, monkeypatch
):
    release = pytorchcv_release
    server.routes[release["path"]] = Route(release["zip"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1") as err:
        build_pytorchcv(release)
    assert release["file_name"] in str(err.value) and str(release["cache"]) in str(err.value)
    assert server.requests == []


def test_pytorchcv_with_no_network_is_one_line(pytorchcv_release, monkeypatch):
    monkeypatch.setenv(PYTORCHCV_URL_ENV, closed_port_url())
    with pytest.raises(UserError, match="could not download pytorchcv weights") as err:
        build_pytorchcv(pytorchcv_release)
    assert "ConnectionError" in str(err.value) and "\n" not in str(err.value)
    assert files_under(pytorchcv_release["cache"]) == []


def test_an_explicit_weights_path_never_touches_the_network(server, pytorchcv_release, tmp_path):
    path = tmp_path / "mine.pth"
    torch.save(pytorchcv_release["reference"], path)
    model = build({"name": "preresnet20", "pretrained": str(path)}, 10)
    assert_weights(model, pytorchcv_release["reference"])
    assert server.requests == []


# -- timm through the Hugging Face hub ---------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_REPO = "timm/mobilenetv2_100.ra_in1k"  # configs/model/mobilenetv2.yaml's pretrained tag


@pytest.fixture
def hub(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """The hub's resolve endpoint for mobilenetv2_100.ra_in1k on the local server, serving a
    generated model.safetensors with the headers huggingface_hub requires (commit, ETag = the
    file's sha256, size)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    cfg = {"name": "mobilenetv2", "pretrained": False, "pretrained_tag": "ra_in1k"}
    reference = shifted_state(build(cfg, 10))
    body = save_safetensors(reference)
    sha256 = hashlib.sha256(body).hexdigest()
    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{sha256}"'}
    return {"reference": reference, "body": body, "headers": headers, "sha256": sha256,
            "path": f"/{HUB_REPO}/resolve/main/model.safetensors", "cache": tmp_path / "hf_hub"}


def build_timm(hub) -> torch.nn.Module:
    cfg = {"name": "mobilenetv2", "pretrained": True, "pretrained_tag": "ra_in1k",
           "cache_dir": str(hub["cache"])}
    return build(cfg, 10)


def weight_files(cache: Path) -> list[str]:
    """Files holding (part of) a download: blobs, snapshots, temporary files."""
    return [f for f in files_under(cache) if "/blobs/" in f or "/snapshots/" in f or "incomplete" in f]


def test_timm_weights_download_from_the_hub_once_then_come_from_the_cache(server, hub):
    server.routes[hub["path"]] = Route(hub["body"], headers=hub["headers"])
    assert_weights(build_timm(hub), hub["reference"])
    repo_dir = "models--timm--mobilenetv2_100.ra_in1k"
    assert weight_files(hub["cache"]) == [
        f"{repo_dir}/blobs/{hub['sha256']}", f"{repo_dir}/snapshots/{COMMIT}/model.safetensors"
    ]
    # huggingface_hub asks for the file's metadata (HEAD), then fetches it (GET), once
    asked = [r for r in server.requests if r[1].startswith(f"/{HUB_REPO}/")]
    assert asked == [("HEAD", hub["path"]), ("GET", hub["path"])]
    before = len(server.requests)
    assert_weights(build_timm(hub), hub["reference"])
    assert len(server.requests) == before  # the second run read the cache without a request


def test_timm_falls_back_to_pytorch_model_bin_as_timm_does(server, hub):
    server.not_found_headers = {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}
    buffer = io.BytesIO()
    torch.save(hub["reference"], buffer)
    body = buffer.getvalue()
    headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(body).hexdigest()}"'}
    server.routes[f"/{HUB_REPO}/resolve/main/pytorch_model.bin"] = Route(body, headers=headers)
    assert_weights(build_timm(hub), hub["reference"])
    assert ("GET", f"/{HUB_REPO}/resolve/main/pytorch_model.bin") in server.requests


@pytest.mark.parametrize("fault", ["cut_off", "wrong_content", "missing"])
def test_a_failed_hub_download_leaves_no_weights_and_says_what_to_do(server, hub, fault):
    body = hub["body"]
    if fault == "cut_off":
        server.routes[hub["path"]] = Route(body[: len(body) // 2], headers=hub["headers"],
                                           declared=len(body))
    elif fault == "wrong_content":  # right size, wrong bytes: only the sha256 (ETag) tells
        server.routes[hub["path"]] = Route(bytes(len(body)), headers=hub["headers"])
    with pytest.raises(UserError) as err:
        build_timm(hub)
    message = str(err.value)
    assert "\n" not in message and HUB_REPO in message
    assert ("corrupt" if fault == "wrong_content" else "could not download") in message
    assert weight_files(hub["cache"]) == []


def test_hf_hub_offline_names_the_file_folder_and_command_without_a_request(server, hub, monkeypatch):
    server.routes[hub["path"]] = Route(hub["body"], headers=hub["headers"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as err:
        build_timm(hub)
    message = str(err.value)
    assert "model.safetensors" in message and str(hub["cache"]) in message
    assert f"hf download {HUB_REPO}" in message and "\n" not in message
    assert server.requests == []


def test_an_unknown_pretrained_tag_lists_the_valid_ones():
    with pytest.raises(UserError, match="no pretrained tag 'nope'.*ra_in1k"):
        build({"name": "mobilenetv2", "pretrained": False, "pretrained_tag": "nope"}, 10)
    with pytest.raises(UserError, match="timm models only"):
        build({"name": "preresnet20", "pretrained": False, "pretrained_tag": "x"}, 10)


# -- CIFAR through torchvision -----------------------------------------------------------------


@pytest.fixture
def cifar_archive(server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A tiny CIFAR-10 in torchvision's python format, tarred as the real release is, served as
    torchvision's CIFAR10.url with its md5 as CIFAR10.tgz_md5."""
    from test_data import write_cifar
    from torchvision import datasets

    written = write_cifar(tmp_path / "source", fine=False)
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    body = archive.getvalue()
    monkeypatch.setattr(datasets.CIFAR10, "url", f"{server.url}/cifar-10-python.tar.gz")
    monkeypatch.setattr(datasets.CIFAR10, "tgz_md5", hashlib.md5(body).hexdigest())
    return {"body": body, "written": written, "root": tmp_path / "data" / "cifar10"}


def build_cifar(root: Path, download):
    from omegaconf import OmegaConf

    from nulsq.data import build as build_data

    cfg = OmegaConf.create({"name": "cifar10", "root": str(root), "batch_size": 4,
                            "num_workers": 0, "download": download})
    return build_data(cfg, torch.device("cpu"), 0)


def test_cifar_is_fetched_when_absent_then_read_from_disk(server, cifar_archive):
    server.routes["/cifar-10-python.tar.gz"] = Route(cifar_archive["body"])
    root = cifar_archive["root"]
    bundle = build_cifar(root, "auto")
    written = cifar_archive["written"]
    assert bundle.val_size == len(written["test_batch"][1]) and bundle.num_classes == 10
    # The unpacked release only: no archive, no staging folder.
    assert [p.name for p in root.iterdir()] == ["cifar-10-batches-py"]
    fetched = len(server.requests)  # torchvision resolves redirects with a GET, then downloads
    assert fetched >= 1
    build_cifar(root, "auto")
    build_cifar(root, False)
    assert len(server.requests) == fetched  # present: read from disk without a request


@pytest.mark.parametrize("fault", ["cut_off", "wrong_content", "missing"])
def test_a_failed_cifar_download_leaves_nothing(server, cifar_archive, fault):
    body = cifar_archive["body"]
    if fault == "cut_off":
        server.routes["/cifar-10-python.tar.gz"] = Route(body[: len(body) // 2], declared=len(body))
    elif fault == "wrong_content":  # fails torchvision's md5 check
        server.routes["/cifar-10-python.tar.gz"] = Route(body[:-1] + b"x")
    root = cifar_archive["root"]
    with pytest.raises(UserError, match="could not download CIFAR-10 from") as err:
        build_cifar(root, True)
    assert "\n" not in str(err.value) and "dataset.download=false" in str(err.value)
    assert files_under(root) == []


def test_cifar_download_false_never_touches_the_network(server, cifar_archive):
    server.routes["/cifar-10-python.tar.gz"] = Route(cifar_archive["body"])
    root = cifar_archive["root"]
    with pytest.raises(UserError, match="CIFAR-10 not found") as err:
        build_cifar(root, False)
    assert str(root / "cifar-10-batches-py") in str(err.value)
    assert server.requests == [] and not root.exists()


def test_bad_download_setting_is_named():
    with pytest.raises(UserError, match="dataset.download='sometimes' is not understood"):
        build_cifar(Path("nowhere"), "sometimes")


def test_imagenet_is_never_downloaded_and_its_error_says_how_to_prepare_it(tmp_path):
    from omegaconf import OmegaConf

    from nulsq.data import build as build_data

    root = tmp_path / "imagenet"
    cfg = OmegaConf.create({"name": "imagenet", "root": str(root), "batch_size": 4, "download": "auto"})
    with pytest.raises(UserError) as err:
        build_data(cfg, torch.device("cpu"), 0)
    message = str(err.value)
    assert str(root) in message and "<root>/train/<class>/*.JPEG" in message and "<root>/val/" in message
    assert "docs/imagenet.md#preparing-imagenet" in message and not root.exists()
