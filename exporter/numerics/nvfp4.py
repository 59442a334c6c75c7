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
    SHARED_SCALE_SLACK,
    NumericsError,
    abs_max,
    as_scalar_scale,
    check_shared_scale,
    check_weight,
    require_finite,
    row_chunks,
)
from quantgate.exporter.numerics.e2m1 import E2M1_MAX, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from quantgate.exporter.numerics.fp8 import E4M3_MAX, FP8_DTYPE, amax_over
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS

BLOCK = 16  # input elements per e4m3 block scale
BLOCK_SCALE_MIN = 2.0**-9  # smallest positive e4m3fn value (a subnormal)
BLOCK_SCALE_MAX = E4M3_MAX  # e4m3fn has no inf: anything >= 480 would cast to NaN
GLOBAL_AMAX_DIVISOR = E2M1_MAX * E4M3_MAX  # 2688


def nvfp4_global_scale(amax: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """ModelOpt ``weight_scale_2``: ``amax / 2688`` in fp32 as ``numerics`` divides, 0-d.

    A zero amax (all-zero weight) gives 1.0: ModelOpt would divide 0/0 into NaN block scales; a
    positive scale keeps the export loadable and dequantizes to exact zeros.
    """
    return nvfp4_global_scales(amax.float().reshape(()), numerics)


def nvfp4_global_scales(amax: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """`nvfp4_global_scale` of every entry of ``amax`` [...] (one per matrix) -> fp32 [...]."""
    return amax_over(amax, GLOBAL_AMAX_DIVISOR, GLOBAL_AMAX_DIVISOR, what="NVFP4", numerics=numerics)


def nvfp4_input_scale(amax: Tensor | float, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """Static NVFP4 activation scale ``input_amax / 2688`` (fp32, amax's shape); a zero amax becomes
    6 (the e2m1 maxbound), so 6/2688."""
    return amax_over(amax, GLOBAL_AMAX_DIVISOR, E2M1_MAX, what="NVFP4 input", numerics=numerics)


def nvfp4_block_scale(block_amax: Tensor, weight_scale_2: Tensor) -> Tensor:
    """Per-block e4m3 scales. block_amax fp32 [..., in/16], weight_scale_2 fp32 [] -> e4m3 [..., in/16]."""
    scale = block_amax / (E2M1_MAX * weight_scale_2)  # fp32; 6 * ws2 is rounded first, as ModelOpt
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # all-zero (or underflowing) block
    return scale.clamp_(BLOCK_SCALE_MIN, BLOCK_SCALE_MAX).to(FP8_DTYPE)


def weight_amax(w: Tensor) -> Tensor:
    """max |w| as a 0-d fp32 tensor (for computing a shared scale over a fused group)."""
    return abs_max(w).float()


def matrix_amax(w: Tensor) -> Tensor:
    """max |w| of each matrix of ``w [..., out, in]`` -> fp32 [...] (row-chunked: bounded memory)."""
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    return abs_max(w.reshape(-1, in_f), last_dim=True).reshape(-1, out_f).amax(dim=1).float().reshape(lead)


def shared_global_scale(weights: list[Tensor] | tuple[Tensor, ...], numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """One ``weight_scale_2`` for a fused group (q/k/v, gate/up): from the max amax of its members."""
    if not weights:
        raise NumericsError("NVFP4: a fused group needs at least one weight")
    amax = torch.stack([weight_amax(w).to(weights[0].device) for w in weights]).max()
    require_finite(amax, what="NVFP4 fused group")
    return nvfp4_global_scale(amax, numerics)


def _check_nvfp4_weight(w: Tensor) -> None:
    if w.ndim <= 2:
        check_weight(w, what="NVFP4", in_divisor=BLOCK)   # a 2-D weight (or a clear error)
        return
    check_weight(w.reshape(-1, w.shape[-1])[:1], what="NVFP4", in_divisor=BLOCK)   # dtype and in % 16
    if w.numel() == 0:
        raise NumericsError(f"NVFP4: the weight is empty (shape {tuple(w.shape)})")


def _given_scales(scale: Tensor | float, amax: Tensor, device: torch.device) -> Tensor:
    """Caller-supplied ``weight_scale_2``: one for all matrices (0-d) or one per matrix (amax's shape),
    checked to be finite, > 0 and to cover each matrix's amax."""
    s = torch.as_tensor(scale, dtype=torch.float32).to(device)
    if s.numel() == 1:   # shared by every matrix (a fused group; a 3-D expert tensor)
        s = as_scalar_scale(s, device, what="NVFP4 weight_scale_2")
        check_shared_scale(amax.max(), s, GLOBAL_AMAX_DIVISOR, what="NVFP4", scale_name="weight_scale_2")
        return s
    if s.numel() != amax.numel():
        raise NumericsError(f"NVFP4: got {s.numel()} global scales for {amax.numel()} experts (matrices)")
    s = s.reshape(amax.shape)
    bad, ratio = torch.stack([(~torch.isfinite(s) | (s <= 0)).any().float(),
                              (amax / (GLOBAL_AMAX_DIVISOR * s)).max()]).tolist()
    if bad:
        raise NumericsError("NVFP4 weight_scale_2: every scale must be finite and > 0")
    if ratio > SHARED_SCALE_SLACK:
        raise NumericsError(f"NVFP4: a given weight_scale_2 is too small for its matrix (max|w| is {ratio:.4g}x "
                            f"{GLOBAL_AMAX_DIVISOR:g} * weight_scale_2); compute it from that matrix's amax")
    return s


def quantize_nvfp4(w: Tensor, weight_scale_2: Tensor | None = None,
                   numerics: str = DEFAULT_NUMERICS) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize weights to NVFP4: one matrix, or a stack of them (experts; the GPU batch).

    w [..., out, in] (bf16/fp16/fp32, in % 16 == 0) -> (packed uint8 [..., out, in/2],
    block_scale float8_e4m3fn [..., out, in/16], weight_scale_2 fp32 [...]).
    ``weight_scale_2``: None (each matrix its own, from its amax), one 0-d scale every matrix
    shares (a fused group, e.g. from `shared_global_scale`; a 3-D expert tensor), or one per matrix
    [...]. ``numerics`` (`quantgate.exporter.numerics.modes`) only affects a global scale computed here.
    Rows are processed in chunks, so the fp32 temporaries stay about one chunk whatever the stack.
    """
    _check_nvfp4_weight(w)
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    blocks = w.reshape(-1, in_f // BLOCK, BLOCK)  # [rows, in/16, 16], rows = matrices x out
    block_amax = abs_max(blocks, last_dim=True).float()  # [rows, in/16]
    require_finite(block_amax, what="NVFP4")
    if weight_scale_2 is None:
        per_matrix = block_amax.reshape(-1, out_f * (in_f // BLOCK)).amax(dim=1)   # [matrices]
        weight_scale_2 = nvfp4_global_scales(per_matrix.reshape(lead), numerics)   # [...]
    else:
        amax = block_amax.reshape(-1, out_f * (in_f // BLOCK)).amax(dim=1).reshape(lead)
        weight_scale_2 = _given_scales(weight_scale_2, amax, w.device)
    per_row = (weight_scale_2 if weight_scale_2.ndim == 0   # one for every row, or one per matrix:
               else weight_scale_2.reshape(-1, 1).expand(-1, out_f).reshape(-1, 1))   # fp32 [] or [rows, 1]
    block_scale = nvfp4_block_scale(block_amax, per_row)  # e4m3 [rows, in/16]
    divisor = block_scale.float() * per_row  # fp32 [rows, in/16]
    packed = torch.empty((blocks.shape[0], in_f // 2), dtype=torch.uint8, device=w.device)
    for rows in row_chunks(blocks.shape[0], in_f, w.device):
        scaled = blocks[rows] / divisor[rows].unsqueeze(-1)  # fp32 [r, in/16, 16]
        packed[rows] = pack_nibbles(e2m1_encode(scaled).reshape(-1, in_f))
    return (packed.reshape(*lead, out_f, in_f // 2), block_scale.reshape(*lead, out_f, in_f // BLOCK),
            weight_scale_2 if weight_scale_2.ndim == len(lead) else weight_scale_2.expand(lead))


def dequantize_nvfp4(
    packed: Tensor, block_scale: Tensor, weight_scale_2: Tensor, dtype: torch.dtype = torch.bfloat16
) -> Tensor:
    """uint8 [..., out, in/2], e4m3 [..., out, in/16], fp32 [] or [...] -> [..., out, in] in ``dtype``
    (fp32 math, then cast)."""
    lead, (out_f, half_in) = packed.shape[:-2], packed.shape[-2:]
    in_f = 2 * half_in
    if block_scale.shape != (*lead, out_f, in_f // BLOCK):
        raise NumericsError(
            f"NVFP4: block scale shape {tuple(block_scale.shape)} does not match packed weight "
            f"{tuple(packed.shape)} (expected {(*lead, out_f, in_f // BLOCK)})"
        )
    ws2 = weight_scale_2.to(device=packed.device, dtype=torch.float32)
    per_row = ws2.reshape(-1, 1).expand(-1, out_f).reshape(-1, 1) if ws2.numel() > 1 else ws2.reshape(())
    per_block = block_scale.reshape(-1, in_f // BLOCK).float() * per_row   # fp32 [rows, in/16]
    flat = packed.reshape(-1, half_in)
    out = torch.empty((flat.shape[0], in_f), dtype=dtype, device=packed.device)
    for rows in row_chunks(flat.shape[0], in_f, packed.device):
        values = e2m1_decode(unpack_nibbles(flat[rows])).reshape(-1, in_f // BLOCK, BLOCK)
        out[rows] = (values * per_block[rows].unsqueeze(-1)).reshape(-1, in_f).to(dtype)
    return out.reshape(*lead, out_f, in_f)


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
    scales = None if weight_scale_2 is None else weight_scale_2.reshape(w.shape[0])
    return quantize_nvfp4(w, scales, numerics)


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
