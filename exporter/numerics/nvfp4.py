"""NVFP4 weights (E2M1 elements, e4m3 scales per 16 inputs, fp32 global scale), ModelOpt 0.47 exact.

ModelOpt 0.47 (``NVFP4QTensor``, dynamic block path used by ``_export_quantized_weight``; see
``reference/lab_modelopt.md`` §6 and ``reference/modelopt.md`` §3), reproduced op for op:
1. ``weight_scale_2 = amax.float() / 2688`` (fp32 ``[]``), amax = max|W| (or a fused group's max);
   on CUDA ModelOpt computes it as ``amax * fl32(1/2688)`` (`quantgate.exporter.numerics.modes`).
2. ``block_scale = block_amax.float() / (6 * weight_scale_2)`` in fp32; a zero quotient becomes
   1.0; then clamped to [2^-9, 448] and cast to float8_e4m3fn (round to nearest even).
3. ``codes = e2m1(W / (float(block_scale) * weight_scale_2))``: the product of the two scales is
   rounded to fp32 first, then W (promoted to fp32) is divided by it.
4. Two codes per byte, element 0 in the low nibble; ``weight`` is uint8 ``[out, in/2]``.
Dequantization: ``e2m1 * (float(block_scale) * weight_scale_2)`` in fp32, then cast.

compressed-tensors stores the reciprocals of the two per-tensor scales
(``weight_global_scale = 1 / weight_scale_2``, ``input_global_scale = 1 / input_scale``);
`ct_global_scale` / `modelopt_global_scale` convert between the conventions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import (
    NumericsError,
    abs_max,
    as_scalar_scale,
    check_shared_scale,
    check_weight,
    require_finite,
    row_chunks,
)
from quantgate.exporter.numerics.e2m1 import E2M1_MAX, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from quantgate.exporter.numerics.fp8 import E4M3_MAX, FP8_DTYPE, static_input_scale
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS, scalar_div

BLOCK = 16  # input elements per e4m3 block scale
BLOCK_SCALE_MIN = 2.0**-9  # smallest positive e4m3fn value (a subnormal)
BLOCK_SCALE_MAX = E4M3_MAX  # e4m3fn has no inf: anything >= 480 would cast to NaN
GLOBAL_AMAX_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688


def nvfp4_global_scale(amax: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """ModelOpt ``weight_scale_2``: ``amax / 2688`` in fp32 as ``numerics`` divides, 0-d.

    A zero amax (all-zero weight) gives 1.0: ModelOpt would divide 0/0 into NaN block scales; a
    positive scale keeps the export loadable and dequantizes to exact zeros.
    """
    a = amax.float().reshape(())
    value = float(a.item())
    if not (value >= 0.0 and value != float("inf")):
        raise NumericsError(f"NVFP4: amax must be finite and >= 0, got {value}")
    a = torch.where(a == 0, torch.full_like(a, GLOBAL_AMAX_DIVISOR), a)
    return scalar_div(a, GLOBAL_AMAX_DIVISOR, numerics)


def nvfp4_input_scale(amax: Tensor | float, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """Static NVFP4 activation scale ``input_amax / 2688`` (fp32, amax's shape); a zero amax becomes
    6 (the e2m1 maxbound), so 6/2688."""
    return static_input_scale(amax, GLOBAL_AMAX_DIVISOR, E2M1_MAX, what="NVFP4", numerics=numerics)


def nvfp4_block_scale(block_amax: Tensor, weight_scale_2: Tensor) -> Tensor:
    """Per-block e4m3 scales. block_amax fp32 [..., in/16], weight_scale_2 fp32 [] -> e4m3 [..., in/16]."""
    scale = block_amax / (E2M1_MAX * weight_scale_2)  # fp32; 6 * ws2 is rounded first, as ModelOpt
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero (or underflowing) block
    return scale.clamp_(BLOCK_SCALE_MIN, BLOCK_SCALE_MAX).to(FP8_DTYPE)


def weight_amax(w: Tensor) -> Tensor:
    """max |w| as a 0-d fp32 tensor (for computing a shared scale over a fused group)."""
    return abs_max(w).float()


def shared_global_scale(weights: list[Tensor] | tuple[Tensor, ...], numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """One ``weight_scale_2`` for a fused group (q/k/v, gate/up): from the max amax of its members."""
    if not weights:
        raise NumericsError("NVFP4: a fused group needs at least one weight")
    amax = torch.stack([weight_amax(w).to(weights[0].device) for w in weights]).max()
    require_finite(amax, what="NVFP4 fused group")
    return nvfp4_global_scale(amax, numerics)


def quantize_nvfp4(w: Tensor, weight_scale_2: Tensor | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize one weight to NVFP4.

    w [out, in] (bf16/fp16/fp32, in % 16 == 0) ->
    (packed uint8 [out, in/2], block_scale float8_e4m3fn [out, in/16], weight_scale_2 fp32 []).
    Pass ``weight_scale_2`` (e.g. from `shared_global_scale`) when a fused group shares it;
    ``numerics`` (`quantgate.exporter.numerics.modes`) only affects the global scale computed here.
    """
    check_weight(w, what="NVFP4", in_divisor=BLOCK)
    out_f, in_f = w.shape
    blocks = w.reshape(out_f, in_f // BLOCK, BLOCK)  # [out, in/16, 16]
    block_amax = abs_max(blocks, last_dim=True).float()  # [out, in/16]
    require_finite(block_amax, what="NVFP4")
    if weight_scale_2 is None:
        weight_scale_2 = nvfp4_global_scale(block_amax.max(), numerics)
    else:
        weight_scale_2 = as_scalar_scale(weight_scale_2, w.device, what="NVFP4 weight_scale_2")
        check_shared_scale(
            block_amax.max(), weight_scale_2, GLOBAL_AMAX_DIVISOR, what="NVFP4", scale_name="weight_scale_2"
        )
    block_scale = nvfp4_block_scale(block_amax, weight_scale_2)  # e4m3 [out, in/16]
    divisor = block_scale.float() * weight_scale_2  # fp32 [out, in/16]
    packed = torch.empty((out_f, in_f // 2), dtype=torch.uint8, device=w.device)
    for rows in row_chunks(out_f, in_f, w.device):
        scaled = blocks[rows] / divisor[rows].unsqueeze(-1)  # fp32 [r, in/16, 16]
        packed[rows] = pack_nibbles(e2m1_encode(scaled).reshape(-1, in_f))
    return packed, block_scale, weight_scale_2


def dequantize_nvfp4(
    packed: Tensor, block_scale: Tensor, weight_scale_2: Tensor, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """uint8 [out, in/2], e4m3 [out, in/16], fp32 [] -> [out, in] in ``dtype`` (fp32 math, then cast)."""
    out_f, half_in = packed.shape
    in_f = 2 * half_in
    if block_scale.shape != (out_f, in_f // BLOCK):
        raise NumericsError(
            f"NVFP4: block scale shape {tuple(block_scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} (expected {(out_f, in_f // BLOCK)})"
        )
    per_block = block_scale.float() * weight_scale_2.to(device=packed.device, dtype=torch.float32)
    out = torch.empty((out_f, in_f), dtype=dtype, device=packed.device)
    for rows in row_chunks(out_f, in_f, packed.device):
        values = e2m1_decode(unpack_nibbles(packed[rows])).reshape(-1, in_f // BLOCK, BLOCK)
        out[rows] = (values * per_block[rows].unsqueeze(-1)).reshape(-1, in_f).to(dtype)
    return out


def quantize_nvfp4_experts(w: Tensor, weight_scale_2: Tensor | None = None,
                           numerics: str = DEFAULT_NUMERICS) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked experts, each with its own global scale (ModelOpt unfuses experts this way).

    w [E, out, in] -> (uint8 [E, out, in/2], e4m3 [E, out, in/16], fp32 [E]).
    ``weight_scale_2`` [E], if given, holds one (possibly shared) global scale per expert.
    """
    if w.ndim != 3:
        raise NumericsError(f"NVFP4: expected stacked experts [E, out, in], got shape {tuple(w.shape)}")
    if weight_scale_2 is not None and weight_scale_2.numel() != w.shape[0]:
        raise NumericsError(f"NVFP4: got {weight_scale_2.numel()} global scales for {w.shape[0]} experts")
    parts = [
        quantize_nvfp4(w[e], None if weight_scale_2 is None else weight_scale_2.reshape(-1)[e], numerics)
        for e in range(w.shape[0])
    ]
    packed, scales, globals_ = zip(*parts)
    return torch.stack(packed), torch.stack(scales), torch.stack(globals_)


def ct_global_scale(modelopt_scale: Tensor) -> Tensor:
    """compressed-tensors ``*_global_scale`` (fp32 [1]) from ModelOpt's ``weight_scale_2``/``input_scale``."""
    s = modelopt_scale.to(torch.float32).reshape(1)
    return torch.ones_like(s) / s


def modelopt_global_scale(ct_scale: Tensor) -> Tensor:
    """ModelOpt ``weight_scale_2``/``input_scale`` (fp32 []) from a compressed-tensors global scale.

    Not an exact inverse of `ct_global_scale`: 1/(1/x) can differ from x by one fp32 ulp.
    """
    s = ct_scale.to(torch.float32).reshape(())
    return torch.ones_like(s) / s
