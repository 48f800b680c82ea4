"""The models a config can name, and `build`, which turns `cfg.model` into an FP network.

Each entry is a ModelSpec registered under the short name users type (`model.name=preresnet20`);
docs/fidelity.md (section B) says which library architecture each paper name is.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from nulsq.errors import UserError
from nulsq.models.fetch import library_weights
from nulsq.models.pretrained import classifier_name, load_pretrained
from nulsq.registry import Registry


def _no_size_kwargs(input_size: int) -> dict[str, Any]:
    """Most networks are size-agnostic (global pooling): nothing to tell the constructor."""
    return {}


def _swin_size_kwargs(input_size: int) -> dict[str, Any]:
    """Swin's patch grid depends on the image size.

    Below 224 timm would shrink the 7x7 windows to the smaller feature maps, which changes the
    relative-position tables so ImageNet weights no longer fit; always_partition keeps the 7x7
    windows (padding the maps) instead. At 224 and above it stays off, as in the original model.
    """
    return {"img_size": input_size, "always_partition": input_size < 224}


@dataclass(frozen=True)
class ModelSpec:
    """What the rest of nulsq needs to know about one registered model.

    Args:
        name: the short config name (`model.name`).
        source: the library that builds it, "timm" or "pytorchcv".
        arch: the library's architecture name.
        arch_for_classes: num_classes -> another architecture name, where the library has one
            per dataset (pytorchcv's `_cifar10` / `_cifar100` variants, and their weights).
        input_size: the side of the square input it was trained at (32 CIFAR, 224 ImageNet).
        family: "resnet" | "mobilenet" | "swin" | "convnext".
        signed_activations: activations can be negative (GELU, LayerNorm), so the activation
            quantizer must be signed.
        min_input_size: the smallest input side the network accepts: its total stride, where
            the last feature map is 1x1 (tests use it).
        size_kwargs: input side -> extra constructor keyword arguments.
    """

    name: str
    source: str
    arch: str
    input_size: int
    family: str
    min_input_size: int
    signed_activations: bool = False
    arch_for_classes: Mapping[int, str] = field(default_factory=dict)
    size_kwargs: Callable[[int], dict[str, Any]] = _no_size_kwargs

    def arch_for(self, num_classes: int) -> str:
        """The library architecture to build for `num_classes` classes."""
        return self.arch_for_classes.get(num_classes, self.arch)


MODELS: Registry[ModelSpec] = Registry("model")


def _add(spec: ModelSpec) -> ModelSpec:
    return MODELS.register(spec.name)(spec)


# min_input_size is the network's total stride: the input whose last feature map is 1x1.
_add(ModelSpec(name="preresnet20", source="pytorchcv", arch="preresnet20_cifar10",
               arch_for_classes={100: "preresnet20_cifar100"}, input_size=32, family="resnet",
               min_input_size=4))
_add(ModelSpec(name="preresnet56", source="pytorchcv", arch="preresnet56_cifar10",
               arch_for_classes={100: "preresnet56_cifar100"}, input_size=32, family="resnet",
               min_input_size=4))
_add(ModelSpec(name="preresnet18", source="pytorchcv", arch="preresnet18", input_size=224,
               family="resnet", min_input_size=32))
_add(ModelSpec(name="preresnet34", source="pytorchcv", arch="preresnet34", input_size=224,
               family="resnet", min_input_size=32))
_add(ModelSpec(name="resnet18", source="timm", arch="resnet18", input_size=224, family="resnet",
               min_input_size=32))
_add(ModelSpec(name="mobilenetv2", source="timm", arch="mobilenetv2_100", input_size=224,
               family="mobilenet", min_input_size=32))
_add(ModelSpec(name="swin_t", source="timm", arch="swin_tiny_patch4_window7_224", input_size=224,
               family="swin", min_input_size=32, signed_activations=True,
               size_kwargs=_swin_size_kwargs))
_add(ModelSpec(name="convnext_t", source="timm", arch="convnext_tiny", input_size=224,
               family="convnext", min_input_size=32, signed_activations=True))


Constructor = Callable[[str, int, dict[str, Any]], nn.Module]
SOURCES: Registry[Constructor] = Registry("model source")


@SOURCES.register("timm")
def _build_timm(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


@SOURCES.register("pytorchcv")
def _build_pytorchcv(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    from pytorchcv.model_provider import get_model

    # pytorchcv's CIFAR constructors assert num_classes in {10, 100}: build at the native size
    # and swap the classifier when the run wants another number of classes.
    model = get_model(arch, pretrained=False, **kwargs)
    _resize_classifier(model, num_classes)
    _pool_globally(model)
    return model


def _pool_globally(model: nn.Module) -> None:
    """Make a pytorchcv network accept any input size, computing the same thing at its own.

    pytorchcv ends `features` with AvgPool2d(kernel = the last map's side at the native input), so
    any other input size breaks the classifier's shape. A global average pool is the same
    operation at the native size and also works at the small sizes tests and the demo use.
    """
    features = getattr(model, "features", None)
    if isinstance(getattr(features, "final_pool", None), nn.AvgPool2d):
        features.final_pool = nn.AdaptiveAvgPool2d(1)


def _resize_classifier(model: nn.Module, num_classes: int) -> None:
    head_name = classifier_name(model)
    head = model.get_submodule(head_name)
    if head.out_features == num_classes:
        return
    parent_name, _, child = head_name.rpartition(".")
    new_head = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
    setattr(model.get_submodule(parent_name), child, new_head)


def _weights_path(
    pretrained: Any, spec: ModelSpec, model: nn.Module, arch: str, cache_dir: str | None
) -> Path | None:
    """Where `model.pretrained` says the weights are: None (random init), the cache, or a path."""
    if pretrained is None or pretrained is False:
        return None
    if pretrained is True:
        return library_weights(spec.source, model, arch, cache_dir)
    if isinstance(pretrained, (str, Path)):
        return Path(pretrained)
    raise UserError(
        f"model.pretrained={pretrained!r} is not understood; use false, true (the library's "
        f"cache, else its download) or a path to a weights file"
    )


def _tagged(spec: ModelSpec, arch: str, tag: str | None) -> str:
    """timm's `arch.tag`, which selects the pretrained weights (hub repo) the model carries."""
    if not tag:
        return arch
    if spec.source != "timm":
        raise UserError(
            f"model.pretrained_tag applies to timm models only; {spec.name} comes from "
            f"{spec.source}: set it to null"
        )
    import timm

    tags = [name.partition(".")[2] for name in timm.list_pretrained(f"{arch}.*")]
    if tag not in tags:
        raise UserError(
            f"timm {arch} has no pretrained tag '{tag}'; valid tags: {', '.join(tags)}"
        )
    return f"{arch}.{tag}"


def build(cfg: Mapping[str, Any], num_classes: int) -> nn.Module:
    """Build the FP network `cfg.name` for `num_classes` classes and load its weights.

    The library constructor always runs with pretrained=False; `model.pretrained=true` then takes
    the library's own file (its cache, else its download: nulsq.models.fetch).

    Args:
        cfg: the model config: `name` (a registered model), `pretrained` (false | true | path,
            default false), optional `input_size` (null = the model's own), optional
            `cache_dir` (null = the library's default cache; used when pretrained is true),
            optional `pretrained_tag` (timm only: which of the architecture's weights, e.g.
            "tv_in1k"; null = timm's default).
        num_classes: outputs of the classifier; a pretrained head of another size is replaced
            by a fresh one (with a warning).

    Returns:
        The network on the CPU, in training mode.

    Raises:
        UserError: unknown name, input too small, bad `pretrained`, missing/unmatched weights.
    """
    name = cfg.get("name")
    if not name:
        raise UserError(f"model.name is missing; valid names: {', '.join(MODELS.names())}")
    spec = MODELS.get(str(name))
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes={num_classes!r} must be a positive integer")
    input_size = cfg.get("input_size") or spec.input_size
    if input_size < spec.min_input_size:
        raise UserError(
            f"model.input_size={input_size} is too small for {spec.name}; "
            f"use at least {spec.min_input_size} (or null for {spec.input_size})"
        )
    arch = _tagged(spec, spec.arch_for(num_classes), cfg.get("pretrained_tag"))
    model = SOURCES.get(spec.source)(arch, num_classes, spec.size_kwargs(input_size))
    cache_dir = cfg.get("cache_dir")
    path = _weights_path(cfg.get("pretrained", False), spec, model, arch, cache_dir)
    if path is not None:
        load_pretrained(model, path, f"{spec.name} ({spec.source} {arch})")
    return model
