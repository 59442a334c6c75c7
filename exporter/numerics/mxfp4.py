"""MXFP4 weights: E2M1 elements in blocks of 32 inputs, one E8M0 (power-of-two) scale per block.

Two producers round the shared exponent differently, so there are two quantizers:

compressed-tensors ``mxfp4-pack-quantized`` (`quantize_mxfp4_ct`), as llm-compressor 0.14 writes it
with the ``MXFP4`` preset (compressed-tensors 0.20, CPU path), op for op:

1. ``amax`` = max |w| over the block, in the weight's dtype (``memoryless_minmax`` observer).
2. ``round_to_power_2`` (``quantization/utils/mxfp_utils.py`` l.73-128): add ``1 << (mantissa - 2)``
   to the bit pattern of amax and keep only the exponent bits. amax goes UP to the next power of
   two iff its significand is >= 1.75 (so the block max cannot round past E2M1's 6), else DOWN.
3. ``generate_mx_scales`` (l.131-152): ``exp = 127 + floor(log2(p)) - 2`` (2 = floor(log2 6));
   ``calculate_qparams`` (``quantization/utils/helpers.py`` l.81-131) clamps it to [0, 255] (a
   zero block, p = 0, gives -inf -> 0), converts it to ``2 ** (exp - 127)`` in the weight's
   dtype, and replaces a scale that underflowed to 0 by 1.0 (``_get_dtype_eps(uint8)``). Only
   float16 underflows (``2**-25`` and below): an fp16 block with amax < 0.75 * 2**-14 (incl. an
   all-zero block) gets scale 1.0, i.e. stored exponent 127; in bf16/fp32 a zero block stores 0.
4. Elements: ``w / scale`` in the weight's dtype, clamp to +-6, round to E2M1 with ties to even
   (``fp4_utils.cast_to_fp4``: the same thresholds as `e2m1_encode`); the sign bit is set for
   negative inputs that round to 0, not for -0.0. Two codes per byte, element 2j in the low nibble
   (``pack_fp4_to_uint8``).
5. Stored: ``weight_packed`` uint8 ``[out, in/2]``, ``weight_scale`` uint8 ``[out, in/32]`` holding
   ``127 + floor(log2(scale))`` (``compressors/mx_utils.py::compress_mx_scale``).

GPT-OSS native ``mxfp4`` (`quantize_mxfp4_native`), as OpenAI's ``triton_kernels``
``numerics_details/mxfp.py::downcast_to_mxfp_torch`` computes it with its default
``DequantScaleRoundingMode.ROUND_UP`` (transformers' ``integrations/mxfp4.py::quantize_to_mxfp4``
calls exactly that): in fp32, ``d = amax / 6`` then ``d`` is rounded UP to a power of two by
``(bits(d) + 0x007FFFFF) & 0x7F800000``; the stored byte is that power's biased exponent (a zero
block gives 0); elements are ``w * (1 / 2**(e - 127))`` rounded to E2M1 ties-to-even with
saturation at 6, the sign taken from the sign BIT (so -0.0 gives code 8). The block max therefore
never clips, where compressed-tensors clips significands in (1.5, 1.75) to 6.
Layout: ``*_blocks`` uint8 ``[..., out, in/32, 16]`` (the packed bytes of each block, low nibble
first: transformers' ``convert_moe_packed_tensors`` reads ``blk & 0x0F`` as element 2j) and
``*_scales`` uint8 ``[..., out, in/32]``; `mxfp4_native_layout` converts from the packed form.

Dequantization is the same for both: ``e2m1 * 2 ** (exp - 127)`` (exact in fp32), cast once.
All functions take any leading dims (``w [..., out, in]``), run on the input's device and process
rows in chunks so the fp32 temporaries stay bounded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import (
    FLOAT_DTYPES,
    NumericsError,
    abs_max,
    require_finite,
    row_chunks,
)
from quantgate.exporter.numerics.e2m1 import E2M1_MAX, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles

MX_BLOCK = 32                        # input elements per E8M0 scale (OCP MX block size)
E8M0_BIAS = 127                      # stored byte = unbiased exponent + 127
E8M0_MAX = 255                       # largest byte compressed-tensors clamps to (255 itself is NaN in OCP)
E2M1_EMAX = 2                        # floor(log2(E2M1_MAX)): the block max lands in [4, 8) before clipping
NATIVE_BLOCK_BYTES = MX_BLOCK // 2   # last dim of GPT-OSS ``*_blocks``
# (int view, mantissa bits, exponent bias) of each source dtype, for compressed-tensors' bit rounding.
_FLOAT_BITS: dict[torch.dtype, tuple[torch.dtype, int, int]] = {
    torch.bfloat16: (torch.int16, 7, 127),
    torch.float16: (torch.int16, 10, 15),
    torch.float32: (torch.int32, 23, 127),
}
_FP32_EXP_MASK = 0x7F800000
_FP32_MANT_MASK = 0x007FFFFF


def _check_mx_weight(w: Tensor, what: str) -> tuple[int, int]:
    """Raise `NumericsError` unless ``w [..., out, in]`` is a non-empty float tensor with in % 32 == 0."""
    if w.dtype not in FLOAT_DTYPES:
        raise NumericsError(f"{what}: weight dtype {w.dtype} is not supported; expected one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    if w.ndim < 2 or w.numel() == 0:
        raise NumericsError(f"{what}: expected a non-empty weight [..., out, in], got shape {tuple(w.shape)}")
    in_f = w.shape[-1]
    if in_f % MX_BLOCK:
        raise NumericsError(f"{what}: in_features={in_f} is not divisible by {MX_BLOCK} (the MX block); "
                            "exclude this module from quantization (keep it in the source dtype)")
    return w.numel() // in_f, in_f


def ct_block_exponent(amax: Tensor) -> Tensor:
    """compressed-tensors' E8M0 byte for block maxima in the weight's dtype (steps 2-3 above).

    amax [...] (bf16/fp16/fp32, >= 0, finite) -> uint8 [...]."""
    int_dtype, mant, bias = _FLOAT_BITS[amax.dtype]
    exp_bits = torch.finfo(amax.dtype).bits - 1 - mant
    bits = amax.contiguous().view(int_dtype).to(torch.int32)           # sign bit is 0: amax >= 0
    field = (bits + (1 << (mant - 2))) >> mant                         # biased exponent of p
    if bool((field >= (1 << exp_bits) - 1).any()):
        raise NumericsError("MXFP4: a block max rounds past the largest finite value of "
                            f"{amax.dtype}; fix the source checkpoint or exclude this module")
    exp = (field - bias + E8M0_BIAS - E2M1_EMAX).clamp(0, E8M0_MAX)
    exp = torch.where(field == 0, torch.zeros_like(exp), exp)          # p == 0: log2 = -inf -> 0
    # 2**(exp - 127) must be representable in amax's dtype, else compressed-tensors' scale is 0 -> 1.0.
    tiny = torch.finfo(amax.dtype).smallest_normal * torch.finfo(amax.dtype).eps
    lowest = int(torch.log2(torch.tensor(tiny, dtype=torch.float64)).item()) + E8M0_BIAS
    return torch.where(exp < lowest, torch.full_like(exp, E8M0_BIAS), exp).to(torch.uint8)


def native_block_exponent(amax: Tensor) -> Tensor:
    """triton_kernels' ROUND_UP E8M0 byte: ceil to a power of two of ``fp32(amax) / 6``.

    amax [...] (finite, >= 0) -> uint8 [...]."""
    d = amax.float() / torch.tensor(E2M1_MAX, dtype=torch.float32, device=amax.device)
    # finite amax <= 3.4e38, so d < 2**126 and the byte stays <= 253 (255 would be E8M0's NaN)
    return (((d.view(torch.int32) + _FP32_MANT_MASK) & _FP32_EXP_MASK) >> 23).to(torch.uint8)


def e8m0_to_float(exp: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """E8M0 bytes -> ``2 ** (exp - 127)`` in ``dtype`` (exact in fp32 for bytes 0..254)."""
    return torch.ldexp(torch.ones(exp.shape, dtype=torch.float32, device=exp.device),
                       exp.to(torch.int32) - E8M0_BIAS).to(dtype)


def _block_amax(w: Tensor, rows: int, in_f: int) -> Tensor:
    """max |w| per block, in w's dtype. w [..., out, in] -> [rows, in/32]; raises on NaN/Inf."""
    blocks = w.reshape(rows, in_f // MX_BLOCK, MX_BLOCK)
    amax = abs_max(blocks, last_dim=True)
    require_finite(amax, what="MXFP4")
    return amax


def quantize_mxfp4_ct(w: Tensor) -> tuple[Tensor, Tensor]:
    """compressed-tensors ``mxfp4-pack-quantized``, bit-identical to llm-compressor's MXFP4 preset.

    w [..., out, in] (bf16/fp16/fp32, in % 32 == 0) ->
    (weight_packed uint8 [..., out, in/2], weight_scale uint8 [..., out, in/32])."""
    rows, in_f = _check_mx_weight(w, "MXFP4")
    exp = ct_block_exponent(_block_amax(w, rows, in_f))                    # uint8 [rows, in/32]
    scale = e8m0_to_float(exp, w.dtype)                                    # exact powers of two
    blocks = w.reshape(rows, in_f // MX_BLOCK, MX_BLOCK)
    packed = torch.empty((rows, in_f // 2), dtype=torch.uint8, device=w.device)
    for r in row_chunks(rows, in_f, w.device):
        scaled = (blocks[r] / scale[r].unsqueeze(-1)).clamp_(-E2M1_MAX, E2M1_MAX)  # in w's dtype, as CT
        packed[r] = pack_nibbles(e2m1_encode(scaled).reshape(-1, in_f))
    lead = w.shape[:-1]
    return packed.reshape(*lead, in_f // 2), exp.reshape(*lead, in_f // MX_BLOCK)


def quantize_mxfp4_native(w: Tensor) -> tuple[Tensor, Tensor]:
    """GPT-OSS native ``mxfp4`` (triton_kernels ``downcast_to_mxfp_torch``, ROUND_UP scales).

    w [..., out, in] (in % 32 == 0; experts in [E, out, in] orientation, i.e. the transpose of
    transformers' ``gate_up_proj [E, H, 2I]``) ->
    (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32]).
    transformers' ``quantize_to_mxfp4`` casts the weight to bf16 first: pass bf16 weights to match
    it on an fp32 source (the reference function itself takes any float dtype, as this one does)."""
    rows, in_f = _check_mx_weight(w, "MXFP4")
    exp = native_block_exponent(_block_amax(w, rows, in_f))               # uint8 [rows, in/32]
    # 1 / 2**(e-127) as the reference computes it; 0 for a zero block (its values become +-0).
    inv = torch.where(exp == 0, torch.zeros((), device=w.device), 1.0 / e8m0_to_float(exp))
    blocks = w.reshape(rows, in_f // MX_BLOCK, MX_BLOCK)
    packed = torch.empty((rows, in_f // 2), dtype=torch.uint8, device=w.device)
    for r in row_chunks(rows, in_f, w.device):
        scaled = blocks[r].float() * inv[r].unsqueeze(-1)                 # fp32 [r, in/32, 32]
        code = e2m1_encode(scaled) | (torch.signbit(scaled).view(torch.uint8) << 3)  # -0.0 -> 8
        packed[r] = pack_nibbles(code.reshape(-1, in_f))
    lead = w.shape[:-1]
    return mxfp4_native_layout(packed.reshape(*lead, in_f // 2), exp.reshape(*lead, in_f // MX_BLOCK))


def mxfp4_native_layout(packed: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """Packed form -> GPT-OSS ``*_blocks`` / ``*_scales`` (a view: same bytes, same nibble order).

    packed uint8 [..., out, in/2], scales uint8 [..., out, in/32] ->
    (blocks uint8 [..., out, in/32, 16], scales unchanged)."""
    _check_packed(packed, scales)
    return packed.reshape(*scales.shape, NATIVE_BLOCK_BYTES), scales


def mxfp4_from_native(blocks: Tensor, scales: Tensor) -> tuple[Tensor, Tensor]:
    """GPT-OSS ``*_blocks [..., out, in/32, 16]`` -> packed ``[..., out, in/2]`` (inverse of the above)."""
    if blocks.shape[-1] != NATIVE_BLOCK_BYTES or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise NumericsError(f"MXFP4: blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
                            f"(expected blocks [..., out, in/32, {NATIVE_BLOCK_BYTES}])")
    return blocks.reshape(*scales.shape[:-1], scales.shape[-1] * NATIVE_BLOCK_BYTES), scales


def _check_packed(packed: Tensor, scales: Tensor) -> None:
    if packed.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise NumericsError(f"MXFP4: expected uint8 packed weight and scales, got {packed.dtype} and {scales.dtype}")
    if packed.ndim < 2 or packed.shape[-1] % NATIVE_BLOCK_BYTES:
        raise NumericsError(f"MXFP4: expected a packed weight [..., out, in/2] with in % {MX_BLOCK} == 0, "
                            f"got shape {tuple(packed.shape)}")
    expected = (*packed.shape[:-1], packed.shape[-1] * 2 // MX_BLOCK)
    if tuple(scales.shape) != expected:
        raise NumericsError(f"MXFP4: scale shape {tuple(scales.shape)} does not match packed weight "
                            f"{tuple(packed.shape)} (expected {expected})")


def dequantize_mxfp4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """uint8 [..., out, in/2], E8M0 uint8 [..., out, in/32] -> [..., out, in] in ``dtype``.

    Serves both producers (same element and scale encoding); for the native form pass
    `mxfp4_from_native` first. fp32 math (exact), one cast at the end."""
    _check_packed(packed, scales)
    in_f = packed.shape[-1] * 2
    rows = packed.numel() // packed.shape[-1]
    flat, per_block = packed.reshape(rows, -1), e8m0_to_float(scales.reshape(rows, -1))
    out = torch.empty((rows, in_f), dtype=dtype, device=packed.device)
    for r in row_chunks(rows, in_f, packed.device):
        values = e2m1_decode(unpack_nibbles(flat[r])).reshape(-1, in_f // MX_BLOCK, MX_BLOCK)
        out[r] = (values * per_block[r].unsqueeze(-1)).reshape(-1, in_f).to(dtype)
    return out.reshape(*packed.shape[:-1], in_f)



def dequantize_mxfp4_native(blocks: Tensor, scales: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """GPT-OSS ``*_blocks`` uint8 [..., out, in/32, 16] + ``*_scales`` [..., out, in/32] -> [..., out, in]."""
    return dequantize_mxfp4(*mxfp4_from_native(blocks, scales), dtype)

__all__ = ["E8M0_BIAS", "MX_BLOCK", "ct_block_exponent", "dequantize_mxfp4", "dequantize_mxfp4_native", "e8m0_to_float",
           "mxfp4_from_native", "mxfp4_native_layout", "native_block_exponent", "quantize_mxfp4_ct",
           "quantize_mxfp4_native"]
