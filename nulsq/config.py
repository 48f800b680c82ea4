"""The config schema: every key a run accepts, with its type and default.

`validate(cfg)` merges a composed config into this schema, so a mistyped key or a wrong type fails
at start with one line naming the key, instead of being silently ignored (the authors' code
returned None for unknown keys). Group files under configs/ only set values; defaults live here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nulsq.errors import UserError


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
    name: str = "fp"
    bits: int = 32
    weight: Optional[RoleConfig] = None  # null = weights stay full precision
    act: Optional[RoleConfig] = None  # null = activations stay full precision
    grad_scale: str = "none"  # none | lsq (1/sqrt(N*Qp))
    first_last: str = "dynamic8"  # dynamic8 (authors) | fp | same
    signed_act: Optional[bool] = None  # null = the model's own (signed for Swin-T, ConvNeXt)
    step_guard: str = "stop"  # stop | clamp: what to do when a step size goes <= 0 or NaN
    step_floor: float = 1.0e-6  # the clamp floor for step_guard=clamp


@dataclass
class OptimGroupConfig:
    name: str = "sgd"  # sgd | adamw
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8


@dataclass
class OptimConfig:
    weights: OptimGroupConfig = field(default_factory=OptimGroupConfig)
    quant: OptimGroupConfig = field(default_factory=lambda: OptimGroupConfig(name="adamw", lr=1e-4))


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | constant
    warmup_epochs: float = 0.0
    warmup_lr: float = 0.0


@dataclass
class InitConfig:
    method: str = "mse"  # lsq | mse | mse_search
    batches: int = 100
    reduce: str = "max"  # max (authors' code) | mean (supplement D-III LSQ init over 1,000 batches)
    from_run: Optional[str] = None  # progressive: a (b+1)-bit run directory or checkpoint


@dataclass
class PretrainConfig:
    """Full-precision training inside the same run before QAT (the embedded demo)."""

    epochs: int = 0
    lr: float = 0.1
    weight_decay: float = 5.0e-4
    warmup_epochs: float = 0.0


@dataclass
class TrainerConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # stop each training stage after this many steps
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    compile: Any = "auto"  # auto (on for CUDA) | true | false
    amp: Any = "auto"  # auto (bf16 on CUDA) | true | false
    channels_last: Any = "auto"
    resume: Optional[str] = None  # null | auto | path to a checkpoint
    log_interval: int = 50
    sync_bn: bool = False
    output_dir: Optional[str] = None  # null = Hydra's run directory (or ./runs/<name> without Hydra)


@dataclass
class WandbConfig:
    mode: Optional[str] = None  # null = online with an API key, else offline | disabled
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
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]
        raise UserError(
            f"bad config key '{key}': {reason}; see nulsq/config.py for every valid key"
        ) from None
    return merged
