"""Data folders set once: `paths.data_dir` from NULSQ_DATA (else data/), every dataset's root
derived from it, and a machine's own git-ignored configs/local/default.yaml."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from nulsq.config import validate
from nulsq.errors import UserError
from nulsq.paths import check_data_dir

from conftest import CONFIG_DIR, compose_config


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet"])
def test_each_dataset_root_follows_nulsq_data(monkeypatch, tmp_path, name):
    monkeypatch.delenv("NULSQ_DATA", raising=False)
    assert validate(compose_config([f"dataset={name}"])).dataset.root == f"data/{name}"
    monkeypatch.setenv("NULSQ_DATA", str(tmp_path))
    cfg = validate(compose_config([f"dataset={name}"]))
    assert cfg.paths.data_dir == str(tmp_path) and cfg.dataset.root == f"{tmp_path}/{name}"
    # the command line still wins, for all datasets or for one
    assert validate(compose_config([f"dataset={name}", "paths.data_dir=/d"])).dataset.root == f"/d/{name}"
    assert validate(compose_config([f"dataset={name}", "dataset.root=/x"])).dataset.root == "/x"


def test_a_local_config_file_sets_the_machine_s_folders(monkeypatch, tmp_path):
    """configs/local/example.yaml copied to default.yaml is read by every run (in a copy of
    configs/, so a developer's own local file is never touched)."""
    monkeypatch.delenv("NULSQ_DATA", raising=False)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    example = (configs / "local" / "example.yaml").read_text()
    assert "/data/datasets" in example
    (configs / "local" / "default.yaml").write_text(example.replace("/data/datasets", str(tmp_path)))
    with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
        cfg = validate(compose("config", overrides=["logger=none", "dataset=cifar10"]))
    assert cfg.dataset.root == f"{tmp_path}/cifar10"


def test_a_chosen_data_dir_must_exist_the_default_may_not(tmp_path):
    assert check_data_dir("data", env={}) == Path("data")  # created on demand
    assert check_data_dir(str(tmp_path), env={}) == tmp_path
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match=f"NULSQ_DATA={missing} does not exist; create it"):
        check_data_dir(missing, env={"NULSQ_DATA": missing})
    with pytest.raises(UserError, match=f"paths.data_dir={missing} does not exist"):
        check_data_dir(missing, env={})
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is not a folder"):
        check_data_dir(str(tmp_path / "file"), env={})
