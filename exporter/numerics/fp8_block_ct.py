"""FP8 E4M3 weights with 128x128 block scales in compressed-tensors' form (llm-compressor ``FP8_BLOCK``).

Bit-identical to llm-compressor 0.14's ``FP8_BLOCK`` preset on compressed-tensors 0.20 (CPU path),
which differs from transformers' fine-grained FP8 (`quantgate.exporter.numerics.fp8_block`) in
every step, so it has its own quantizer:

- The scale is stored in the weight's dtype (bf16 for a bf16 checkpoint), as ``weight_scale``
  (not ``weight_scale_inv``), and it is ``amax / 448`` computed as a division in that dtype
  (``calculate_qparams``: ``max_val_pos / (bit_range.to(dtype) / 2)``,
  ``quantization/utils/helpers.py`` l.81-88); a zero scale becomes ``finfo(dtype).eps``
  (l.118-129: 2**-7 for bf16). amax is the block's max |w| in that dtype (``memoryless_minmax``).
- ``weight = clamp(w / scale, -448, 448).to(float8_e4m3fn)`` where ``w / scale`` is rounded to the
  weight's dtype first (``lifecycle/forward_helpers.py::_quantize``: ``scaled = x / scale`` in bf16,
  then ``round_to_quantized_type_args``): a double rounding bf16 -> e4m3 that a direct fp32 -> e4m3
  cast does not reproduce. The symmetric scheme's all-zero ``weight_zero_point`` is still added
  (``scaled += zero_point``), which turns a -0.0 quotient (a negative weight whose quotient
  underflows in the weight's dtype) into +0.0; a tiny negative quotient still casts to e4m3 -0.
- Ragged edges are allowed: the weight is zero-padded to whole blocks (``_process_block`` ->
  ``maybe_pad_tensor_for_block_quant``) and the scale grid is ``[ceil(out/128), ceil(in/128)]``;
  padding cannot raise a block's amax (compressed-tensors takes ``max(|min|, |max|, 0)``).
- Dequantization ``q.to(dtype) * scale`` equals `dequantize_fp8_block` (the fp32 product of an
  e4m3 value and a bf16 scale is exact, so one final rounding either way).

Shapes: any leading dims, ``w [..., out, in]`` -> ``q [..., out, in]``,
``weight_scale [..., ceil(out/128), ceil(in/128)]`` in ``w.dtype``.
Activations of the preset are dynamic per token group of 128 (config only, nothing stored).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from quantgate.exporter.numerics.common import FLOAT_DTYPES, NumericsError, require_finite
from quantgate.exporter.numerics.fp8_block import (
    E4M3_MAX,
    FP8_DTYPE,
    STEP_ELEMS,
    WEIGHT_BLOCK,
    dequantize_fp8_block,
)


def _check(w: Tensor, block: tuple[int, int]) -> None:
    if w.dtype not in FLOAT_DTYPES:
        raise NumericsError(f"FP8 block (compressed-tensors): weight dtype {w.dtype} is not supported; "
                            f"expected one of {', '.join(str(d) for d in FLOAT_DTYPES)}")
    if w.ndim < 2 or w.numel() == 0:
        raise NumericsError(f"FP8 block (compressed-tensors): expected a non-empty weight [..., out, in], "
                            f"got shape {tuple(w.shape)}")
    if min(block) < 1:
        raise NumericsError(f"FP8 block (compressed-tensors): invalid block {block}")


def ct_block_scale(amax: Tensor) -> Tensor:
    """``weight_scale`` from per-block amax, both in the weight's dtype: ``amax / 448``, 0 -> eps."""
    scale = amax / torch.tensor(E4M3_MAX, dtype=amax.dtype, device=amax.device)
    return torch.where(scale == 0, torch.full_like(scale, torch.finfo(amax.dtype).eps), scale)


def quantize_fp8_block_ct(w: Tensor, block: tuple[int, int] = WEIGHT_BLOCK) -> tuple[Tensor, Tensor]:
    """w [..., out, in] (bf16/fp16/fp32, any out/in) ->
    (weight float8_e4m3fn [..., out, in], weight_scale w.dtype [..., ceil(out/b0), ceil(in/b1)])."""
    _check(w, block)
    b0, b1 = block
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    ob, ib = -(-out_f // b0), -(-in_f // b1)
    flat = w.reshape(-1, out_f, in_f)                                           # [n, out, in]
    q = torch.empty(flat.shape, dtype=FP8_DTYPE, device=w.device)
    scales = torch.empty((flat.shape[0], ob, ib), dtype=w.dtype, device=w.device)
    step = max(1, STEP_ELEMS // (b0 * ib * b1))                                 # row blocks per step
    for i in range(flat.shape[0]):
        for r0 in range(0, ob, step):
            r1 = min(ob, r0 + step)
            part = flat[i, r0 * b0:r1 * b0]                                     # [<= (r1-r0)*b0, in]
            rows = part.shape[0]
            padded = F.pad(part, (0, ib * b1 - in_f, 0, (r1 - r0) * b0 - rows))  # zeros, as compressed-tensors
            tiles = padded.reshape(r1 - r0, b0, ib, b1)                         # [rb, b0, ib, b1]
            amax = tiles.abs().amax(dim=(1, 3))                                 # [rb, ib] in w's dtype
            require_finite(amax, what="FP8 block (compressed-tensors)")
            scale = ct_block_scale(amax)
            scaled = tiles / scale[:, None, :, None]                           # rounded to w's dtype
            scaled = scaled.add_(0.0).clamp_(-E4M3_MAX, E4M3_MAX)  # + the zero point: -0.0 -> +0.0
            q[i, r0 * b0:r0 * b0 + rows] = scaled.to(FP8_DTYPE).reshape(-1, ib * b1)[:rows, :in_f]
            scales[i, r0:r1] = scale
    return q.reshape(w.shape), scales.reshape(*lead, ob, ib)


def dequantize_fp8_block_ct(q: Tensor, weight_scale: Tensor, dtype: torch.dtype | None = None,
                            block: tuple[int, int] = WEIGHT_BLOCK) -> Tensor:
    """q float8 [..., out, in], weight_scale [..., ceil(out/b0), ceil(in/b1)] -> [..., out, in] in
    ``dtype`` (default: the scale's dtype, as compressed-tensors decompresses)."""
    return dequantize_fp8_block(q, weight_scale, dtype=dtype or weight_scale.dtype, block=block)


__all__ = ["ct_block_scale", "dequantize_fp8_block_ct", "quantize_fp8_block_ct"]
