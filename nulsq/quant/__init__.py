"""Quantizers: the maths (functional), the modules that own step sizes, init, and model conversion."""

from nulsq.quant import quantizers as _core  # noqa: F401  (registers lsq, nulsq, dynamic_max)
from nulsq.quant import rivals as _rivals  # noqa: F401  (registers lcq, pact, apot, dorefa, lqnets)
from nulsq.quant.base import QUANTIZERS, Quantizer, quantizer_parameters
from nulsq.quant.convert import initialize_quantizers, quantize_model, quantizers

__all__ = [
    "QUANTIZERS",
    "Quantizer",
    "initialize_quantizers",
    "quantize_model",
    "quantizer_parameters",
    "quantizers",
]
