"""Bit packing of integer weight codes: b bits per code, no padding between codes.

A code c in [code_min, code_min + 2^b - 1] is stored as the unsigned offset c - code_min, its bit
i at bit position (index * b + i) of a little-endian bit stream (bit 0 of byte 0 first). The
stream is padded with zero bits to a whole byte, so n codes take ceil(n * b / 8) bytes.
"""

from __future__ import annotations

import math

import numpy as np
import torch

MAX_BITS = 8


def packed_size(numel: int, bits: int) -> int:
    """Bytes that `numel` codes of `bits` bits take."""
    return math.ceil(numel * bits / 8)


def pack_codes(codes: torch.Tensor, bits: int, code_min: int) -> torch.Tensor:
    """The codes (any integer tensor, flattened in row-major order) as a 1-D uint8 tensor.

    Args:
        codes: integers in [code_min, code_min + 2^bits - 1].
        bits: bits per code, 1..8.
        code_min: the smallest representable code (-Qn for signed codes, 0 for unsigned ones).
    """
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    offsets = codes.reshape(-1).to(torch.int64) - code_min
    if offsets.numel() and (offsets.min() < 0 or offsets.max() >= 2**bits):
        raise ValueError(f"codes outside [{code_min}, {code_min + 2**bits - 1}]")
    values = offsets.numpy().astype(np.uint8)
    bit_matrix = (values[:, None] >> np.arange(bits, dtype=np.uint8)[None, :]) & 1
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, code_min: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: `numel` codes as a 1-D int64 tensor.

    Raises ValueError if `packed` does not hold exactly the bytes `numel` codes take.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_size(numel, bits):
        raise ValueError(
            f"packed codes hold {packed.numel()} {packed.dtype} values, expected "
            f"{packed_size(numel, bits)} uint8 bytes for {numel} codes of {bits} bits"
        )
    stream = np.unpackbits(packed.numpy(), count=numel * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int64))[None, :]
    offsets = (stream.reshape(numel, bits).astype(np.int64) * weights).sum(1)
    return torch.from_numpy(offsets) + code_min
