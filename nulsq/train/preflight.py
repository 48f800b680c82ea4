"""Plan and check a whole run before any data is loaded or any step is trained.

`preflight(cfg)` raises a one-line UserError for any mistake a run would otherwise meet late (after
the FP stage has trained for hours, or never, when trainer.max_steps stops it first):
- values that can never train (epochs, batch size, log interval, pretrain lr, ...) and the
  runtime switches (device, amp, compile);
- every name a user picks from a registry (model, dataset, quantizer kinds, init method,
  optimizers), each error naming its key and listing the valid names;
- the model as `quantize_model` converts it: built on the meta device (no memory, no weights
  read), so bits, kinds, `quantizer.*.args` and the first/last policy are checked layer by layer;
- every stage's optimizers and schedules (`nulsq.train.plan`), built on that model's parameters;
- the data root, the source of a progressive run, and the output folder (checked, not created).
Values from a fixed list (step_guard, first_last, ...) are Enums of the schema: Hydra has refused
a bad one already while composing (see `nulsq.config`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nulsq.errors import UserError
from nulsq.paths import check_data_dir
from nulsq.train.plan import StagePlan, build_stage_optim, plan_stages


def check_values(cfg: DictConfig) -> None:
    """Values that can never train, rejected before any work."""
    from nulsq.protocol import check_switches

    if cfg.trainer.epochs <= 0:
        raise UserError(f"trainer.epochs must be > 0, got {cfg.trainer.epochs}")
    if cfg.dataset.batch_size <= 0:
        raise UserError(f"dataset.batch_size must be > 0, got {cfg.dataset.batch_size}")
    if cfg.trainer.max_steps is not None and cfg.trainer.max_steps <= 0:
        raise UserError(f"trainer.max_steps must be > 0 or null, got {cfg.trainer.max_steps}")
    if cfg.pretrain.epochs < 0 or cfg.pretrain.lr <= 0:
        raise UserError("pretrain.epochs must be >= 0 and pretrain.lr > 0")
    if cfg.init.from_run:  # a progressive source that is missing, or unsafe, fails before any work
        progressive_source(cfg)
    if cfg.trainer.log_interval <= 0:
        raise UserError(f"trainer.log_interval must be > 0, got {cfg.trainer.log_interval}")
    if cfg.init.batches <= 0:
        raise UserError(f"init.batches must be > 0, got {cfg.init.batches}")
    for key in ("schedule.warmup_epochs", "schedule.warmup_lr", "pretrain.warmup_epochs",
                "pretrain.weight_decay"):
        value = OmegaConf.select(cfg, key)
        if value < 0:
            raise UserError(f"{key} must be >= 0, got {value}")
    check_switches(cfg)  # init.protocol, quantizer.grad_scale, quantizer.first_last


# init.from_run's checkpoint as the preflight read it, for the run's progressive start to reuse:
# (resolved path, mtime, size, trust) -> its model entry. One entry at most, dropped once used.
_SOURCE: dict[tuple, dict] = {}


def progressive_source(cfg: DictConfig, keep: bool = True) -> tuple[Path, dict]:
    """init.from_run's checkpoint, read (safely, `load_checkpoint`) once per version of the file:
    (its path, {"model": its weights}). The preflight reads it to fail before any work; the run's
    progressive start (`load_progressive`) then gets the same contents instead of a second read
    (a second preflight, the command line's then run()'s, reads nothing either).

    Args:
        cfg: the run config (init.from_run set).
        keep: keep it for a later call; False drops it (the last use: its memory is freed).
    """
    from nulsq.rundir import resolve_checkpoint
    from nulsq.train.checkpoint import load_checkpoint

    path = resolve_checkpoint(cfg.init.from_run)
    trust = bool(cfg.trainer.trust_checkpoint)
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size, trust)
    except OSError:  # gone since it was resolved: load_checkpoint says so in one line
        key = None
    source = _SOURCE.get(key) if key is not None else None
    if source is None:
        source = {"model": load_checkpoint(path, trust)["model"]}
    _SOURCE.clear()
    if keep and key is not None:
        _SOURCE[key] = source
    return path, source


def check_names(cfg: DictConfig, stages: list[StagePlan]) -> None:
    """Every registry name the config picks, the error naming the key (`key: unknown ...`);
    quantizer kinds are checked where the model is converted (`convert.quantize_model`)."""
    from nulsq import data, models
    from nulsq.quant.init import INITS
    from nulsq.train.optim import OPTIMIZERS

    picks = [("model.name", models.MODELS, cfg.model.name),
             ("dataset.name", data.DATASETS, cfg.dataset.name),
             ("init.method", INITS, cfg.init.method)]
    for stage in stages:
        picks += [(f"optim.{group}.name", OPTIMIZERS, stage.optim[group].name)
                  for group in ("weights", "quant")]
    for key, registry, name in picks:
        if name not in registry:
            try:
                registry.get(name)
            except UserError as err:
                raise UserError(f"{key}: {err}") from None


def check_output_dir(path: Path, key: str) -> None:
    """`path` exists as a writable folder or can be made one; nothing is created.

    Args:
        path: the run's output folder.
        key: the config key that chose it (named in the error).
    """
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    reason = None
    if not existing.is_dir():
        reason = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        reason = f"{existing} is not writable"
    if reason:
        raise UserError(
            f"cannot write to the output directory {path} ({reason}); set {key} to a writable folder"
        )


def check_data_root(dataset_cfg: DictConfig) -> None:
    """A dataset root that is set must be a folder, or be fetched (dataset.download)."""
    root = dataset_cfg.get("root")
    if root is None:  # in-memory datasets (digits, synthetic)
        return
    path = Path(str(root)).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"dataset.root {path} is a file; point it at the {dataset_cfg.name} folder")
    if not path.exists() and not dataset_cfg.get("download"):
        raise UserError(
            f"dataset.root {path} does not exist; point it at the {dataset_cfg.name} folder "
            f"(see configs/dataset/{dataset_cfg.name}.yaml), or let a downloadable set fetch itself "
            f"there with dataset.download=auto"
        )


def meta_model(cfg: DictConfig) -> nn.Module:
    """The run's network on the meta device: its real structure, no memory, no weights read.

    The class count is known only once the data is loaded; the head's width changes neither the
    quantizer plan nor the parameter groups, so `dataset.num_classes` stands in for it. A network
    whose constructor computes on its tensors (no meta support) is built on the CPU instead.
    """
    from nulsq.train.build import build_model

    def build() -> nn.Module:
        return build_model(cfg, int(cfg.dataset.num_classes), quantized=False, verbose=False,
                           load_pretrained=False, image_size=cfg.dataset.image_size)[0]

    try:
        with torch.device("meta"):
            return build()
    except UserError:
        raise
    except Exception:  # noqa: BLE001  (the CPU build below raises what is really wrong)
        return build()


def check_plan(cfg: DictConfig, stages: list[StagePlan]) -> None:
    """Convert a meta copy of the model as the QAT stage will, and build every stage's optimizers
    and schedules on its parameters (values that cannot train raise UserError)."""
    from nulsq.train.build import quantize

    model = meta_model(cfg)
    for stage in stages:
        if stage.quantized:
            quantize(model, cfg, verbose=False)
        build_stage_optim(model, stage, steps_per_epoch=1)


def preflight(cfg: DictConfig, output_dir: Path | None = None, output_key: str = "trainer.output_dir"
              ) -> list[StagePlan]:
    """Check the whole run `cfg` (a validated config) describes; return its stages.

    Args:
        cfg: the run config, merged into the schema (`nulsq.config.validate`).
        output_dir: the run's output folder, checked for writability when given.
        output_key: the key that chose `output_dir` (trainer.output_dir or hydra.run.dir).

    Raises:
        UserError: the first mistake found, in one line.
    """
    from nulsq.train.runtime import resolve_runtime

    check_values(cfg)
    resolve_runtime(cfg.trainer)
    stages = plan_stages(cfg)
    check_names(cfg, stages)
    check_data_dir(cfg.paths.data_dir)
    check_data_root(cfg.dataset)
    if output_dir is not None:
        check_output_dir(output_dir, output_key)
    check_plan(cfg, stages)
    return stages
