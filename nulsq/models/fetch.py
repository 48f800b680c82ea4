"""Pretrained weights from a library's own store: its cache, else the library's own download.

`model.pretrained=true` asks the library the model comes from, as its users expect:

- pytorchcv: the file `<arch>-<error>-<sha1[:8]>.pth` in its model folder (`~/.torch/models`);
  when absent, pytorchcv's own downloader fetches the release zip, unpacks it and checks the
  file's full sha1 from pytorchcv's model table. The download runs in a temporary folder beside
  the cache and only a verified file is renamed into place, so a failure leaves nothing behind.
  `NULSQ_PYTORCHCV_URL` replaces pytorchcv's release site (a mirror; the tests' local server).
- timm: the Hugging Face hub file named by the model's pretrained tag (`model.pretrained_tag`,
  null = timm's default), through `huggingface_hub.hf_hub_download` as timm itself does
  (safetensors first, then pytorch_model.bin); it shows progress, writes to a temporary file and
  renames it. Large files' ETag is their sha256, which is checked here after the download.
  `HF_ENDPOINT` points at a mirror, as in huggingface_hub.

A cached file is used as it is, without a request. `HF_HUB_OFFLINE=1` turns every download off
(pytorchcv's too): a missing file is then a one-line UserError naming the file, the folder and the
command that fetches it on a machine with internet.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

from torch import nn

from nulsq.errors import UserError

WeightStore = Callable[[nn.Module, str, "str | None"], Path]
# model source (ModelSpec.source) -> where that library keeps (and fetches) a pretrained file
WEIGHT_STORES: dict[str, WeightStore] = {}


def _weight_store(source: str) -> Callable[[WeightStore], WeightStore]:
    def add(store: WeightStore) -> WeightStore:
        WEIGHT_STORES[source] = store
        return store

    return add

OFFLINE_HINT = "or set model.pretrained=/path/to/file, which works offline"
PYTORCHCV_URL_ENV = "NULSQ_PYTORCHCV_URL"
# huggingface_hub's spelling of true for its environment switches.
_TRUE = {"1", "on", "yes", "true"}


def library_weights(source: str, model: nn.Module, arch: str, cache_dir: str | None) -> Path:
    """The weights file a library's own pretrained loader would use; downloaded if not cached.

    Args:
        source: "timm" or "pytorchcv".
        model: the built network (timm's carries its pretrained_cfg, hence its hub repo).
        arch: the library's architecture name.
        cache_dir: the cache folder; None for the library's default.

    Raises:
        UserError: no published weights, or not cached and the download is off or failed; the
            message names the file, the folder and how to fetch it elsewhere.
    """
    store = WEIGHT_STORES.get(source)
    if store is None:
        raise UserError(f"no pretrained weight store for model source '{source}' (known: "
                        f"{', '.join(sorted(WEIGHT_STORES))}); {OFFLINE_HINT}")
    return store(model, arch, cache_dir)


def offline() -> bool:
    """HF_HUB_OFFLINE=1 (read now, not when huggingface_hub was imported): no downloads at all."""
    from huggingface_hub import constants

    return constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _one_line(err: BaseException) -> str:
    reason = (str(err).strip().splitlines() or [""])[0][:200]
    return f"{type(err).__name__}: {reason}" if reason else type(err).__name__


# -- pytorchcv ---------------------------------------------------------------------------------


class _GrowthMeter:
    """Prints how far a file being written by someone else has grown, every `every` seconds.

    pytorchcv's downloader has no progress hook; it streams into a known file, so its size is
    the progress (the total is not known before the download ends)."""

    def __init__(self, path: Path, label: str, every: float = 1.0) -> None:
        self.path, self.label, self.every = path, label, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._show()

    def _show(self, end: str = "\r") -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        print(f"{self.label}: {size / 2**20:.1f} MiB", end=end, file=sys.stderr, flush=True)

    def __enter__(self) -> "_GrowthMeter":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _pytorchcv_fetch(model_store, arch: str, file_name: str, folder: Path, repo_url: str) -> Path:
    """pytorchcv's get_model_file run into a fresh folder beside `folder`; the verified file is
    then renamed into `folder` (same filesystem: atomic). Raises whatever pytorchcv raised."""
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{file_name}.", suffix=".download"))
    saved_url = model_store.imgclsmob_repo_url
    try:
        model_store.imgclsmob_repo_url = repo_url
        with _GrowthMeter(staging / f"{file_name}.zip", f"downloading {file_name}"):
            # download, unzip, full-sha1 check; raises on a bad status, a broken zip or a bad hash
            fetched = Path(model_store.get_model_file(arch, local_model_store_dir_path=str(staging)))
        print(file=sys.stderr)
        os.replace(fetched, folder / file_name)
    finally:
        model_store.imgclsmob_repo_url = saved_url
        shutil.rmtree(staging, ignore_errors=True)
    return folder / file_name


@_weight_store("pytorchcv")
def _pytorchcv_weights(model: nn.Module, arch: str, cache_dir: str | None) -> Path:
    from pytorchcv.models.common import model_store

    try:
        error, sha1, release = model_store.get_model_name_suffix_data(arch)
    except ValueError as err:
        raise UserError(f"pytorchcv has no pretrained weights for {arch}; {OFFLINE_HINT}") from err
    # pytorchcv's own naming, as in model_store.get_model_file.
    file_name = f"{arch}-{error}-{sha1[:8]}.pth"
    default_root = inspect.signature(model_store.get_model_file).parameters[
        "local_model_store_dir_path"
    ].default
    folder = Path(cache_dir or default_root).expanduser()
    path = folder / file_name
    if path.is_file():
        return path
    repo_url = os.environ.get(PYTORCHCV_URL_ENV) or model_store.imgclsmob_repo_url
    url = f"{repo_url}/releases/download/{release}/{file_name}.zip"
    fetch_elsewhere = (
        f"fetch it where there is internet (`curl -LO {url} && unzip {file_name}.zip`) and put "
        f"{file_name} in {folder}, {OFFLINE_HINT}"
    )
    if offline():
        raise UserError(
            f"pretrained weights for pytorchcv {arch} are not cached and HF_HUB_OFFLINE=1 turns "
            f"downloads off: expected {file_name} in {folder}; {fetch_elsewhere}"
        )
    try:
        return _pytorchcv_fetch(model_store, arch, file_name, folder, repo_url)
    except Exception as err:  # network, HTTP status, broken zip, sha1 mismatch: one message
        print(file=sys.stderr)
        raise UserError(
            f"could not download pytorchcv weights {file_name} from {url} ({_one_line(err)}); "
            f"nothing was left in {folder}; {fetch_elsewhere}"
        ) from err


# -- timm (Hugging Face hub) -------------------------------------------------------------------


def _check_sha256(path: Path, repo: str, name: str) -> None:
    """The hub names a large file's blob by its sha256 (its ETag): compare, and on a mismatch
    remove the blob and its snapshot link so the next run downloads afresh."""
    from huggingface_hub.file_download import REGEX_SHA256

    blob = path.resolve()
    if not REGEX_SHA256.fullmatch(blob.name):
        return  # a small git file: its ETag is a git sha1, nothing published to compare with
    digest = hashlib.sha256()
    with open(blob, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != blob.name:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise UserError(
            f"the download of {name} from hub repo {repo} is corrupt (sha256 {digest.hexdigest()[:12]}... "
            f"instead of {blob.name[:12]}...); it was removed, run again to retry"
        )


def _hf_download(repo: str, names: list[str], revision: str | None, cache_dir: str | None) -> Path:
    """timm's order: the first of `names` the repo holds. Raises huggingface_hub's errors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for i, name in enumerate(names):
        try:
            found = Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))
        except EntryNotFoundError:
            if i + 1 == len(names):
                raise
            continue
        _check_sha256(found, repo, name)
        return found
    raise AssertionError("unreachable: names is never empty")


@_weight_store("timm")
def _timm_weights(model: nn.Module, arch: str, cache_dir: str | None) -> Path:
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.file_download import repo_folder_name

    cfg = getattr(model, "pretrained_cfg", None) or {}
    hub_id = cfg.get("hf_hub_id")
    if not hub_id:
        raise UserError(f"timm has no Hugging Face hub weights for {arch}; {OFFLINE_HINT}")
    repo, _, revision = hub_id.partition("@")
    # timm's own order of preference (timm.models._hub.load_state_dict_from_hf).
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else [
        "model.safetensors",
        "pytorch_model.bin",
    ]
    for name in names:
        found = try_to_load_from_cache(repo, name, cache_dir=cache_dir, revision=revision or None)
        if isinstance(found, str):
            return Path(found)
    folder = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    snapshot = folder / repo_folder_name(repo_id=repo, repo_type="model") / "snapshots" / "<revision>"
    fetch_elsewhere = (
        f"fetch it where there is internet with `hf download {repo} {names[0]} --cache-dir {folder}` "
        f"and copy that folder here, {OFFLINE_HINT}"
    )
    if offline():
        raise UserError(
            f"pretrained weights for timm {arch} are not in the Hugging Face cache {folder} and "
            f"HF_HUB_OFFLINE=1 turns downloads off: expected {snapshot / names[0]} (hub repo "
            f"{repo}); {fetch_elsewhere}"
        )
    try:
        return _hf_download(repo, names, revision or None, cache_dir)
    except UserError:
        raise
    except Exception as err:  # network, HTTP status, size mismatch: one message
        # huggingface_hub reports a failed lookup as "not in the local cache"; its cause says why
        raise UserError(
            f"could not download {names[0]} of hub repo {repo} (timm {arch}) into {folder} "
            f"({_one_line(err.__cause__ or err)}); nothing was left there; {fetch_elsewhere}"
        ) from err
