"""Defaults live once: in the schema (nulsq/config.py), equal to what `python train.py` runs. A
group file states its option's identity (name; a quantizer's kinds and args; the init method) and
only the keys where that option differs from the schema, so no YAML value can silently disagree
with a schema default."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf

from nulsq.config import Config

from conftest import CONFIG_DIR, compose_config

# Groups whose files are options of one config node (experiment and hparams files are
# `@package _global_` overlays that state a paper recipe in full).
GROUPS = ("model", "dataset", "quantizer", "optim", "schedule", "init", "trainer", "logger")
# Keys that say which option a file is, stated even where they equal the schema's default.
IDENTITY = {"name", "kind", "args", "method"}


def _schema() -> dict:
    return OmegaConf.to_container(OmegaConf.structured(Config), enum_to_str=True)


def _restated(value: Any, default: Any, path: str) -> list[str]:
    """Dotted keys under `path` whose value equals the schema's default."""
    if isinstance(value, dict) and isinstance(default, dict):
        out = []
        for key, sub in value.items():
            if key not in IDENTITY and key in default:
                out += _restated(sub, default[key], f"{path}.{key}")
        return out
    return [path] if value == default else []


def test_schema_defaults_are_what_python_train_py_runs():
    composed = OmegaConf.to_container(compose_config(logger="default"), enum_to_str=True)
    assert composed == _schema()


@pytest.mark.parametrize("group", GROUPS)
def test_group_files_set_only_what_differs_from_the_schema(group):
    schema = _schema()[group]
    for path in sorted((CONFIG_DIR / group).glob("*.yaml")):
        values = yaml.safe_load(path.read_text()) or {}
        restated = _restated(values, schema, group)
        assert not restated, f"{path.name} restates schema defaults: {restated}"


def test_config_yaml_only_selects_groups_and_configures_hydra():
    values = yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())
    assert set(values) == {"defaults", "hydra"}


def test_the_demo_keeps_its_numbers():
    # The README's demo: 12 FP epochs, then 8 of nuLSQ-A 2-bit QAT, logged every 10 steps.
    cfg = compose_config()
    assert (cfg.pretrain.epochs, cfg.trainer.epochs, cfg.trainer.log_interval) == (12, 8, 10)
    assert (cfg.quantizer.name, cfg.quantizer.bits, cfg.init.batches) == ("nulsq_a", 2, 20)
