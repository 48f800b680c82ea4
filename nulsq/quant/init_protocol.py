"""How the initialisation batches run through the network (`init.protocol`).

- "authors" (the authors' code, their `stepsize_init`): the converted network in train mode, so
  BatchNorm normalises with batch statistics and updates its running statistics; on each batch
  every quantizer first updates its estimate (running max, or mean, of the per-batch statistic)
  from its current input and then quantizes with it, so deeper layers see the values of the
  already-quantized network. The first/last 8-bit quantizers quantize too.
- "fp_eval": the network in eval mode (BatchNorm on its running statistics, which stay as they
  are) and every quantizer passing its input through unchanged: each layer is initialised on the
  full-precision network's values.

Under DDP the caller passes global batches (`nulsq.train.distributed.GlobalBatches`), so every rank
computes the same statistics, BatchNorm's running statistics included.
"""

from __future__ import annotations

import torch
from torch import nn

from nulsq.errors import UserError
from nulsq.quant.base import Quantizer

INIT_PROTOCOLS = ("authors", "fp_eval")


def check_protocol(protocol: str) -> str:
    """`protocol` if it is one of INIT_PROTOCOLS, else a UserError listing them."""
    if protocol not in INIT_PROTOCOLS:
        raise UserError(f"unknown init.protocol '{protocol}'; valid: {', '.join(INIT_PROTOCOLS)}")
    return protocol


@torch.no_grad()
def initialize_quantizers(model: nn.Module, batches, num_batches: int, protocol: str = "fp_eval") -> int:
    """Run `num_batches` batches (cycling the iterable) through `model` as `protocol` says, then
    set every quantizer's initial parameters. Returns the number of batches seen.

    Args:
        model: a converted network (its Quantizer modules are found by type).
        batches: an iterable of (images, labels); re-iterated when shorter than num_batches.
        num_batches: init.batches (at least one pass: weight quantizers need it too).
        protocol: one of INIT_PROTOCOLS.
    """
    check_protocol(protocol)
    qs = [m for m in model.modules() if isinstance(m, Quantizer)]
    if not qs:
        return 0
    was_training = model.training
    model.train(protocol == "authors")
    for q in qs:
        q.begin_init(quantize=protocol == "authors")
    seen, num_batches = 0, max(1, num_batches)
    try:
        while seen < num_batches:
            for images, _ in batches:
                model(images)
                seen += 1
                if seen >= num_batches:
                    break
            if seen == 0:
                raise UserError("cannot initialise step sizes: the training loader yielded no batch")
    finally:
        for q in qs:
            q.end_init()
        model.train(was_training)
    return seen
