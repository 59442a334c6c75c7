"""Symmetric integer quantization as compressed-tensors does it, and W8A8-int8 weights.

compressed-tensors 0.20 (``calculate_qparams`` + ``forward_helpers._quantize``), symmetric:
- ``scale = amax / (bit_range / 2)`` with ``bit_range = qmax - qmin``: amax/7.5 for int4 and
  amax/127.5 for int8 (not /7 and /127). The positive extreme then rounds to qmax+0.5 and is
  clipped to qmax, which costs the same worst-case error as /7 (/127) while every other value gets
  a finer step. The scale is computed in fp32 and stored in the weight's dtype; a zero scale
  becomes that dtype's machine epsilon.
- ``q = clamp(round(w / scale), qmin, qmax)`` where ``w / scale`` is computed in the weight's dtype
  (BF16 tensors divide in fp32 and round the quotient to BF16), round half to even. Keeping the
  quotient in fp32 would be ~0.65 dB more accurate for int8 (41.4 -> 42.0 dB on Gaussian weights,
  no measurable change for int4); we keep compressed-tensors' rounding so that our bytes equal
  llm-compressor's for the same weights, which the tests check against compressed-tensors itself.
- Dequantization: ``q.to(scale.dtype) * scale``.
Our bytes equal compressed-tensors' on CPU. (On CUDA, torch multiplies by the reciprocal of a CPU
scalar, so compressed-tensors' own scales there can differ by one ulp; ours do not depend on the
device.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import (
    NumericsError,
    abs_max,
    check_weight,
    require_finite,
    row_chunks,
    true_div,
)

INT8_MIN, INT8_MAX = -128, 127


def int_range(bits: int) -> tuple[int, int]:
    """Signed range of a ``bits``-bit integer: (-2^(b-1), 2^(b-1) - 1)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def symmetric_scale(amax: Tensor, bits: int, dtype: torch.dtype) -> Tensor:
    """compressed-tensors' symmetric scale ``amax / ((qmax - qmin) / 2)`` in ``dtype``; 0 -> eps."""
    qmin, qmax = int_range(bits)
    scale = true_div(amax.float(), (qmax - qmin) / 2).to(dtype)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale)


def quantize_symmetric_int(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Symmetric per-group integer quantization along the input dim.

    w [out, in] -> (q int8 [out, in] in [qmin, qmax], scale [out, in/group_size] in w.dtype).
    ``group_size == in`` is per-channel.
    """
    what = f"int{bits}"
    if group_size <= 0:
        raise NumericsError(f"{what}: group_size must be positive, got {group_size}")
    check_weight(w, what=what, in_divisor=group_size)
    qmin, qmax = int_range(bits)
    out_f, in_f = w.shape
    groups = w.reshape(out_f, in_f // group_size, group_size)  # [out, G, g]
    amax = abs_max(groups, last_dim=True)  # [out, G]
    require_finite(amax, what=what)
    scale = symmetric_scale(amax, bits, w.dtype)  # [out, G] in w.dtype
    q = torch.empty((out_f, in_f), dtype=torch.int8, device=w.device)
    for rows in row_chunks(out_f, in_f, w.device):
        scaled = (groups[rows].float() / scale[rows].float().unsqueeze(-1)).to(w.dtype)  # [r, G, g]
        q[rows] = scaled.clamp_(qmin, qmax).round_().to(torch.int8).reshape(-1, in_f)
    return q, scale


def dequantize_symmetric_int(q: Tensor, scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """int8 [out, in] with scales [out, G] -> [out, in]: ``q * scale`` in the scale's dtype."""
    out_f, in_f = q.shape
    if scale.ndim != 2 or scale.shape[0] != out_f or in_f % scale.shape[1]:
        raise NumericsError(
            f"scale shape {tuple(scale.shape)} does not fit a quantized weight of shape {(out_f, in_f)}"
        )
    group_size = in_f // scale.shape[1]
    groups = q.reshape(out_f, scale.shape[1], group_size).to(torch.float32)
    deq = (groups * scale.float().unsqueeze(-1)).to(scale.dtype).reshape(out_f, in_f)
    return deq if dtype is None else deq.to(dtype)


def quantize_w8a8_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """W8A8-int8 weights: per-output-channel symmetric int8.

    w [out, in] -> (q int8 [out, in], weight_scale [out, 1] in w.dtype, = row amax / 127.5).
    Activations are quantized dynamically per token by the engine, so no input scale exists.
    """
    return quantize_symmetric_int(w, bits=8, group_size=w.shape[-1] if w.ndim == 2 else 1)


def dequantize_w8a8_int8(q: Tensor, weight_scale: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """int8 [out, in], scale [out, 1] -> [out, in] in the scale's dtype (or ``dtype``)."""
    return dequantize_symmetric_int(q, weight_scale, dtype)
