"""Model registry (short config name -> library network) and pretrained-weight loading."""

from nulsq.models.registry import MODELS, ModelSpec, build

__all__ = ["MODELS", "ModelSpec", "build"]
