"""Progressive fine-tuning: initialise b-bit nuLSQ steps from a trained (b+1)-bit model.

Supplement D-III: "merging two adjacent step sizes at (b+1)-bit yields effective initialization at
b-bit"; the pairs are (s_1 + s_2), (s_3 + s_4), ... (docs/maths.md, docs/fidelity.md B6), so every
second old level survives.
"""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def merge_adjacent(steps: Tensor, new_count: int) -> Tensor:
    """New step k = old[2k] + old[2k+1] (0-based) for k < new_count; leftover old steps are dropped.

    The steps are counted outward from zero (as `pos_steps` / `neg_steps` of
    `nulsq.quant.functional.nulsq`), so the new levels cumsum(new) are the old levels 2, 4, 6, ...
    Example, positive side 3 -> 2 bits (Qp 7 -> 3):

        old steps  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]  levels 0.1 0.3 0.6 1.0 1.5 2.1 2.8
        new steps  [0.3, 0.7, 1.1]                      levels     0.3     1.0     2.1

    The negative side (Qn 4 -> 2) merges the same way: [a, b, c, d] -> [a + b, c + d].

    Args:
        steps: 1-D old steps, innermost first.
        new_count: the number of steps wanted (Qp or Qn at the lower bit width), at least 1.

    Returns:
        A new 1-D tensor of `new_count` steps (detached, same dtype and device).

    Raises:
        ValueError: `steps` is not 1-D, `new_count` < 1, or fewer than 2 * new_count old steps.
    """
    if steps.dim() != 1:
        raise ValueError(f"steps must be 1-D, got shape {tuple(steps.shape)}")
    if new_count < 1:
        raise ValueError(f"new_count must be at least 1, got {new_count}")
    if steps.numel() < 2 * new_count:
        raise ValueError(
            f"cannot merge {steps.numel()} steps into {new_count}: need at least {2 * new_count}"
        )
    return steps[: 2 * new_count].detach().reshape(new_count, 2).sum(dim=1)
