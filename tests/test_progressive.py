"""Progressive fine-tuning's merge of adjacent step sizes (supplement D-III)."""

from __future__ import annotations

import pytest
import torch

from nulsq.quant.progressive import merge_adjacent


@pytest.mark.parametrize(
    "old_count, new_count",
    [(7, 3), (3, 1), (4, 2), (2, 1), (255, 127), (128, 64)],  # Qp 3->2, 2->1 bits; Qn; 8->7 bits
)
def test_new_levels_are_every_second_old_level(old_count: int, new_count: int) -> None:
    old = 0.05 + torch.rand(old_count, generator=torch.Generator().manual_seed(old_count))
    new = merge_adjacent(old, new_count)
    old_levels = torch.cumsum(old.double(), 0)
    expected = old_levels[1::2][:new_count]  # old levels 2, 4, 6, ... (1-based)
    assert new.shape == (new_count,)
    torch.testing.assert_close(torch.cumsum(new.double(), 0), expected)


def test_docstring_example() -> None:
    old = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], dtype=torch.float64)
    expected = torch.tensor([0.3, 0.7, 1.1], dtype=torch.float64)
    torch.testing.assert_close(merge_adjacent(old, 3), expected)


def test_keeps_dtype_device_and_detaches() -> None:
    old = torch.full((4,), 0.5, dtype=torch.bfloat16, requires_grad=True)
    new = merge_adjacent(old, 2)
    assert new.dtype == torch.bfloat16 and new.device == old.device and not new.requires_grad
    assert new.tolist() == [1.0, 1.0]


@pytest.mark.parametrize("old_count, new_count", [(3, 2), (1, 1), (0, 1)])
def test_too_few_old_steps(old_count: int, new_count: int) -> None:
    with pytest.raises(ValueError, match="cannot merge"):
        merge_adjacent(torch.ones(old_count), new_count)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="1-D"):
        merge_adjacent(torch.ones(2, 2), 1)
    with pytest.raises(ValueError, match="at least 1"):
        merge_adjacent(torch.ones(4), 0)
