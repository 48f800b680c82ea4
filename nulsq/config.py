"""The config schema: every key a run accepts, with its type and its default.

The defaults here are the values `python train.py` runs (the embedded demo); they live only here.
A group file under configs/ states its option's name (for quantizers also the kinds and args)
and only the keys where that option differs from these defaults (tests/test_config_defaults.py
checks both).

`validate(cfg)` merges a composed config into this schema, so a mistyped key or a wrong type fails
at start with one line naming the key, instead of being silently ignored (the authors' code
returned None for unknown keys). A key whose values form a fixed list is an Enum below: Hydra
rejects any other value while it composes, and `config_error` turns that into one line naming the
key, the bad value and the valid ones. Names a plugin can add to (models, datasets, quantizer kinds,
initialisers, optimizers) stay strings, checked against their registry by the preflight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from nulsq.errors import UserError


class Choice(str, Enum):
    """A value from a fixed list; it compares, hashes and prints as its string, so code reading
    the config compares it with plain strings (`cfg.quantizer.step_guard == "clamp"`)."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class GradScale(Choice):
    none = "none"  # scale 1
    lsq = "lsq"  # LSQ's 1/sqrt(N*Qp), N = elements (per sample for activations)
    authors = "authors"  # the authors' code: N = channels for activations (docs/fidelity.md)


class FirstLast(Choice):
    dynamic8 = "dynamic8"  # the authors: 8-bit dynamic quantizers on the signed max, no clamp
    dynamic8_absmax = "dynamic8_absmax"  # 8-bit dynamic on max|x|, clamped (before the ledger)
    fp = "fp"  # left in full precision
    same = "same"  # the configured quantizers and bits


class StepGuard(Choice):
    stop = "stop"  # a step size <= 0 or NaN stops the run
    clamp = "clamp"  # it is clamped to quantizer.step_floor


class InitReduce(Choice):
    max = "max"  # the authors' code
    mean = "mean"  # supplement D-III: LSQ init as the mean over 1,000 batches


class InitProtocol(Choice):
    authors = "authors"  # train mode, quantized forward, running max (the authors' stepsize_init)
    fp_eval = "fp_eval"  # the full-precision network observed in eval mode


class ScheduleName(Choice):
    cosine = "cosine"
    constant = "constant"


class ImageLoader(Choice):
    auto = "auto"  # DALI on CUDA when it is installed, else torchvision
    dali = "dali"  # NVIDIA DALI: JPEG decoding and augmentation on the GPU (CPU backend on CPU)
    torchvision = "torchvision"  # PIL decoding in DataLoader workers


class Device(Choice):
    auto = "auto"  # CUDA if visible, else CPU
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class ModelConfig:
    name: str = "preresnet20"
    pretrained: Any = False  # false | true (library cache, else its download) | path to a local file
    input_size: Optional[int] = None  # null = the model's own (32 CIFAR, 224 ImageNet)
    cache_dir: Optional[str] = None  # null = the library's default cache
    pretrained_tag: Optional[str] = None  # timm only: whose weights, e.g. tv_in1k; null = timm's default


@dataclass
class AugmentConfig:
    crop_padding: Optional[int] = None  # null = the dataset's default
    flip: Optional[bool] = None


@dataclass
class DatasetConfig:
    name: str = "digits"
    root: Optional[str] = None
    batch_size: int = 64  # global, over all ranks
    eval_batch_size: Optional[int] = None
    val_split: float = 0.0  # 0 = official test/val set; 0.1 = the paper's 90/10 split of train
    split_seed: int = 0
    num_workers: int = 4
    download: Any = "auto"  # auto (fetch CIFAR when absent) | true | false (never touch the network)
    image_size: Optional[int] = None
    loader: ImageLoader = ImageLoader.auto  # imagenet only
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # synthetic only
    num_train: int = 512
    num_val: int = 128
    num_classes: int = 10
    channels: int = 3


@dataclass
class RoleConfig:
    kind: str = "lsq"
    args: Dict[str, Any] = field(default_factory=dict)


@dataclass
class QuantizerConfig:
    name: str = "nulsq_a"
    bits: int = 2
    # null = weights (activations) stay full precision
    weight: Optional[RoleConfig] = field(default_factory=lambda: RoleConfig(kind="lsq"))
    act: Optional[RoleConfig] = field(default_factory=lambda: RoleConfig(kind="nulsq"))
    grad_scale: GradScale = GradScale.none
    first_last: FirstLast = FirstLast.dynamic8
    signed_act: Optional[bool] = None  # null = the model's own (signed for Swin-T, ConvNeXt)
    step_guard: StepGuard = StepGuard.stop  # what to do when a step size goes <= 0 or NaN
    step_floor: float = 1.0e-6  # the clamp floor for step_guard=clamp


@dataclass
class OptimGroupConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1.0e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class OptimConfig:
    weights: OptimGroupConfig = field(default_factory=OptimGroupConfig)
    quant: OptimGroupConfig = field(
        default_factory=lambda: OptimGroupConfig(name="adamw", lr=1.0e-3, weight_decay=0.0)
    )


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0


@dataclass
class InitConfig:
    method: str = "mse"  # lsq | mse | mse_search (nulsq.quant.init.INITS)
    batches: int = 20
    reduce: InitReduce = InitReduce.max
    from_run: Optional[str] = None  # progressive: a (b+1)-bit run directory or checkpoint
    protocol: InitProtocol = InitProtocol.authors  # docs/fidelity.md


@dataclass
class PretrainConfig:
    """Full-precision training inside the same run before QAT (the embedded demo)."""

    epochs: int = 12  # 0 = start QAT from model.pretrained
    lr: float = 0.1
    weight_decay: float = 5.0e-4
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 8
    max_steps: Optional[int] = None  # stop each training stage after this many steps
    device: Device = Device.auto
    seed: int = 0
    compile: Any = "auto"  # auto (on for CUDA) | true | false
    amp: Any = "auto"  # auto (bf16 on CUDA) | true | false (fp32: the paper's precision)
    channels_last: Any = "auto"
    resume: Optional[str] = None  # null | auto | path to a checkpoint
    trust_checkpoint: bool = False  # read checkpoints of nulsq before its safe format (numpy, no code)
    log_interval: int = 10
    sync_bn: bool = False
    output_dir: Optional[str] = None  # null = Hydra's run directory (or ./runs/<name> without Hydra)


@dataclass
class WandbConfig:
    mode: Optional[str] = None  # online | offline | disabled | null: WANDB_MODE, else auto (wandb_run.py)
    project: str = "nulsq"
    entity: Optional[str] = None
    dir: Optional[str] = None


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class PathsConfig:
    """Folders set once per machine (NULSQ_DATA, or configs/local/default.yaml)."""

    data_dir: str = "${oc.env:NULSQ_DATA,data}"  # every dataset's default root is <data_dir>/<name>


@dataclass
class Config:
    experiment: str = "default"  # run group: the experiment (table row) name
    table: Optional[str] = None  # the paper table this run reproduces
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    init: InitConfig = field(default_factory=InitConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)


def register_schema() -> None:
    """Make the schema the base of configs/config.yaml (its first default, `nulsq_schema`), so
    every key can be overridden without `+` and a typo fails while Hydra composes."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="nulsq_schema", node=Config)


def validate(cfg: DictConfig | dict) -> DictConfig:
    """Return `cfg` merged into the schema; raise UserError on an unknown key or a wrong type."""
    schema = OmegaConf.structured(Config)
    try:
        merged = OmegaConf.merge(schema, cfg)
    except OmegaConfBaseException as err:
        raise config_error(err) from None
    return merged


def config_error(err: BaseException) -> UserError | None:
    """The one-line UserError for a config OmegaConf refused (`err` or one of its causes, e.g.
    Hydra's ConfigCompositionException around it): an unknown key with the valid keys beside it,
    or a bad value with the reason (for an Enum: the valid values). None if no cause is OmegaConf's.
    """
    cause: BaseException | None = err
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if cause is None:
        return None
    key = getattr(cause, "full_key", None) or "?"
    reason = str(getattr(cause, "msg", cause)).splitlines()[0]
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
        parent, _, _ = key.rpartition(".")
        schema = OmegaConf.structured(Config)
        node = OmegaConf.select(schema, parent) if parent else schema
        valid = sorted(node.keys()) if isinstance(node, DictConfig) else []
        where = f"valid {parent} keys" if parent else "valid top-level keys"
        if valid:
            return UserError(f"unknown config key '{key}'; {where}: {', '.join(valid)}")
        # a free-form mapping such as quantizer.act.args: keys are added with +
        return UserError(f"unknown config key '{key}'; add it with +{key}=<value>")
    return UserError(f"bad value for config key '{key}': {reason}; see nulsq/config.py")
