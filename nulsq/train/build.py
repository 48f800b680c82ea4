"""Build the network a config describes: the FP model, then (for QAT) its quantized twin."""

from __future__ import annotations

from torch import nn

from nulsq import models
from nulsq.quant import quantize_model


def build_model(cfg, num_classes: int, quantized: bool, verbose: bool = True,
                load_pretrained: bool = True, image_size: int | None = None) -> tuple[nn.Module, object]:
    """(model, spec): `cfg.model` built for `num_classes`, converted by `cfg.quantizer` if asked.

    Args:
        cfg: the whole run config.
        num_classes: classifier width (the dataset's).
        quantized: swap Conv2d/Linear for quantized twins per `cfg.quantizer`.
        verbose: print the quantizer table.
        load_pretrained: honour `cfg.model.pretrained` (off when a checkpoint will overwrite it).
        image_size: the data's image side, used when `cfg.model.input_size` is null.
    """
    model_cfg = {**cfg.model}
    if not load_pretrained:
        model_cfg["pretrained"] = False
    if model_cfg.get("input_size") is None and image_size is not None:
        model_cfg["input_size"] = image_size
    model = models.build(model_cfg, num_classes)
    if quantized:
        quantize(model, cfg, verbose)
    return model, models.MODELS.get(cfg.model.name)


def quantize(model: nn.Module, cfg, verbose: bool = True) -> None:
    """Convert `model` in place as `cfg.quantizer` and `cfg.init` say (see quantize_model)."""
    quantize_model(model, cfg.quantizer, models.MODELS.get(cfg.model.name).signed_activations,
                   cfg.init.method, verbose, cfg.init.reduce)
