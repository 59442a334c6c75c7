"""FP4 E2M1 element codes and 4-bit nibble packing (shared by NVFP4 and the int4 packer).

A code is 4 bits: bit 3 is the sign, bits 0-2 index the magnitudes ``E2M1_GRID``.
Rounding is ModelOpt 0.47's ``NVFP4QTensor._cast_fp4``: ``searchsorted`` over ``E2M1_BOUNDS``
(a value equal to a bound goes to the lower code) plus one code up for values exactly equal to
0.75, 1.75 or 3.5. Together that is round-to-nearest with ties to the even code:
0.25->0, 0.75->1.0, 1.25->1.0, 1.75->2.0, 2.5->2.0, 3.5->4.0, 5->4.0; above 5 everything
saturates to 6.0.
The sign bit is ``x < 0``: a tiny negative gives code 8 (-0), while -0.0 gives code 0.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

E2M1_MAX = 6.0
E2M1_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
# Midpoints between neighbouring grid values. A tie at an even-index bound rounds down (to an even
# code), a tie at an odd-index bound (0.75, 1.75, 3.5) rounds up (again to an even code).
E2M1_BOUNDS: tuple[float, ...] = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
SIGN_BIT = 0b1000


def e2m1_encode(x: Tensor) -> Tensor:
    """Round already-scaled values to E2M1 codes. x [...] float -> uint8 [...] in [0, 15]."""
    a = x.abs()
    code = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for i, bound in enumerate(E2M1_BOUNDS):  # 7 vectorised passes: code = number of bounds below |x|
        below = (a >= bound) if i % 2 else (a > bound)
        code += below.view(torch.uint8)  # bool -> 0/1 bytes without a dtype-promoting add
    code += (x < 0).view(torch.uint8) << 3
    return code


def e2m1_decode(code: Tensor) -> Tensor:
    """E2M1 codes to their fp32 values. uint8 [...] -> float32 [...]."""
    grid = torch.tensor(E2M1_GRID, dtype=torch.float32, device=code.device)
    table = torch.cat([grid, -grid])
    table[SIGN_BIT] = 0.0  # code 8 decodes to +0.0, as in ModelOpt's e2m1_values table
    return table[code.to(torch.int32)]


def require_little_endian() -> None:
    """Byte-view packing (nibbles here, int32 words in int4.py) assumes a little-endian host."""
    if sys.byteorder != "little":  # every platform torch ships for is little-endian
        raise RuntimeError("nibble packing reads byte pairs as little-endian integers")


def pack_nibbles(code: Tensor) -> Tensor:
    """Two 4-bit codes per byte along the last dim, element 2j in the LOW nibble.

    uint8 [..., 2n] (values < 16) -> uint8 [..., n]; byte j = code[2j] | code[2j+1] << 4.
    Each byte pair is read as one little-endian int16 ``code[2j] | code[2j+1] << 8``; folding the
    high byte down by 4 bits is ~100x faster on CPU than two strided uint8 slices.
    """
    require_little_endian()
    if code.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of 4-bit codes ({code.shape[-1]})")
    pairs = code.contiguous().view(torch.int16)  # [..., n], low byte = code[2j]
    return (pairs | (pairs >> 4)).to(torch.uint8)  # keeps the low 8 bits


def unpack_nibbles(packed: Tensor) -> Tensor:
    """Inverse of `pack_nibbles`. uint8 [..., n] -> uint8 [..., 2n]."""
    lo = packed & 0x0F
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], -1)
