"""W4A16 weights in compressed-tensors' ``pack-quantized`` layout (int4 symmetric, group 128).

Per quantized Linear (``reference/llmcompressor_and_services.md`` §A2):
- ``weight_packed`` int32 ``[out, in/8]``: each int4 value shifted to unsigned by +8, element
  ``i`` of a row at bit offset ``4 * (i % 8)`` of word ``i // 8`` (LSB first);
- ``weight_scale`` ``[out, in/group]`` in the weight's dtype (scale = group amax / 7.5, see int8.py);
- ``weight_shape`` int64 ``[2]`` = ``[out, in]``. Symmetric: no zero point.
Packing reuses the nibble packer (element 2j in the low nibble of byte j) and reads each 4 bytes
as one little-endian int32, which is exactly the LSB-first word order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.e2m1 import pack_nibbles, require_little_endian, unpack_nibbles
from quantgate.exporter.numerics.int8 import dequantize_symmetric_int, quantize_symmetric_int

W4A16_GROUP_SIZE = 128
INT4_BITS = 4
INT4_OFFSET = 8  # signed [-8, 7] -> unsigned [0, 15]
VALUES_PER_WORD = 32 // INT4_BITS  # 8


def pack_int4(q: Tensor) -> Tensor:
    """int8 [out, in] in [-8, 7] -> int32 [out, in/8], LSB first with the +8 offset."""
    require_little_endian()
    if q.shape[-1] % VALUES_PER_WORD:
        raise NumericsError(f"int4 packing needs in_features divisible by 8, got {q.shape[-1]}")
    nibbles = (q + INT4_OFFSET).to(torch.uint8)  # [out, in] in [0, 15]
    return pack_nibbles(nibbles).contiguous().view(torch.int32)  # bytes [out, in/2] -> [out, in/8]


def unpack_int4(packed: Tensor) -> Tensor:
    """int32 [out, in/8] -> int8 [out, in] in [-8, 7]."""
    require_little_endian()
    nibbles = unpack_nibbles(packed.contiguous().view(torch.uint8))  # [out, in]
    return nibbles.to(torch.int8) - INT4_OFFSET


def quantize_w4a16(w: Tensor, group_size: int = W4A16_GROUP_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """w [out, in] (in % group_size == 0, group_size % 8 == 0) ->
    (weight_packed int32 [out, in/8], weight_scale [out, in/group_size] in w.dtype, weight_shape int64 [2]).
    """
    if group_size % VALUES_PER_WORD:
        raise NumericsError(f"W4A16: group_size must be a multiple of 8, got {group_size}")
    q, scale = quantize_symmetric_int(w, bits=INT4_BITS, group_size=group_size)
    shape = torch.tensor(list(w.shape), dtype=torch.int64, device=w.device)
    return pack_int4(q), scale, shape


def dequantize_w4a16(
    packed: Tensor, scale: Tensor, shape: Tensor | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Inverse of `quantize_w4a16`: -> [out, in] in the scale's dtype (or ``dtype``)."""
    q = unpack_int4(packed)
    if shape is not None and tuple(int(v) for v in shape.tolist()) != tuple(q.shape):
        raise NumericsError(
            f"W4A16: weight_shape {shape.tolist()} does not match the packed weight ({tuple(q.shape)})"
        )
    return dequantize_symmetric_int(q, scale, dtype)
