"""FP8 E4M3 weights with 128x128 block scales (`weight_scale_inv`), bit-identical to transformers.

The reference producer is transformers' own fine-grained FP8 quantizer (`FineGrainedFP8Config`,
`integrations/finegrained_fp8.py::Fp8Quantize._quantize_one`, transformers 5.x), the form the
official DeepSeek-V3/R1 and Qwen3-*-FP8 releases ship and vLLM/SGLang load as `quant_method: fp8`
with `weight_block_size: [128, 128]` (reference formats_beyond_two.md §2). Per block of
BLOCK_OUT x BLOCK_IN weights, all in float32:

- ``amax = max |W|`` over the block; an all-zero block uses 1.0;
- ``scale = 448 / amax`` (multiplier), ``weight_scale_inv = 1 / scale`` (what is stored: the
  engines multiply the float8 value by it). Note ``1 / (448 / amax)`` is not always ``amax / 448``
  bit for bit; we reproduce transformers' two divisions exactly;
- ``weight = clamp(W * scale, -448, 448).to(float8_e4m3fn)``.

Ragged edges: transformers quantizes only weights whose out and in dims are whole multiples of the
block (anything else passes through unquantized), so these functions refuse other shapes with
`NumericsError`; the plan keeps such modules BF16 and excludes them (`quantgate.exporter.recipes`).

Shapes: any leading dims, ``w [..., out, in]`` -> ``q [..., out, in]``,
``scale_inv [..., out / BLOCK_OUT, in / BLOCK_IN]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import FLOAT_DTYPES, NumericsError

E4M3_MAX = 448.0                    # largest finite float8_e4m3fn (torch.finfo(float8_e4m3fn).max)
FP8_DTYPE = torch.float8_e4m3fn
BLOCK_OUT = 128                     # weight rows per scale (weight_block_size[0])
BLOCK_IN = 128                      # weight columns per scale (weight_block_size[1])
WEIGHT_BLOCK: tuple[int, int] = (BLOCK_OUT, BLOCK_IN)
#: weights per quantization step (whole row blocks, at least one): bounds the fp32 temporaries to
#: a few x 64 MB; results do not depend on it (every block is independent).
STEP_ELEMS = 1 << 24


def check_block_shape(shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = WEIGHT_BLOCK,
                      *, what: str = "FP8 block") -> None:
    """Raise `NumericsError` unless ``shape [..., out, in]`` splits into whole ``block`` tiles."""
    if len(shape) < 2:
        raise NumericsError(f"{what}: expected a weight [..., out, in], got shape {tuple(shape)}")
    out_f, in_f = shape[-2], shape[-1]
    if out_f == 0 or in_f == 0:
        raise NumericsError(f"{what}: the weight is empty (shape {tuple(shape)})")
    if out_f % block[0] or in_f % block[1]:
        raise NumericsError(
            f"{what}: weight [{out_f}, {in_f}] does not split into whole {block[0]}x{block[1]} blocks; "
            "transformers' FineGrainedFP8 quantizer leaves such weights unquantized: exclude the module "
            "(keep it in the source dtype)")


def block_scale_inv(amax: Tensor) -> tuple[Tensor, Tensor]:
    """Per-block fp32 amax [..., ob, ib] -> (multiplier scale, stored weight_scale_inv), both fp32.

    A zero amax gives 1.0 for both (transformers' "keep zeros stable")."""
    positive = amax > 0
    safe = torch.where(positive, amax, torch.ones_like(amax))
    scale = torch.where(positive, E4M3_MAX / safe, torch.ones_like(safe))
    return scale, (1.0 / scale).to(torch.float32)


def quantize_fp8_block(w: Tensor, block: tuple[int, int] = WEIGHT_BLOCK) -> tuple[Tensor, Tensor]:
    """w [..., out, in] (bf16/fp16/fp32) -> (q float8_e4m3fn [..., out, in],
    weight_scale_inv fp32 [..., out / block[0], in / block[1]])."""
    if w.dtype not in FLOAT_DTYPES:
        raise NumericsError(f"FP8 block: weight dtype {w.dtype} is not supported; expected one of "
                            f"{', '.join(str(d) for d in FLOAT_DTYPES)}")
    check_block_shape(w.shape, block)
    b0, b1 = block
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    flat = w.reshape(-1, out_f, in_f)                                  # [n, out, in]
    n, ob, ib = flat.shape[0], out_f // b0, in_f // b1
    q = torch.empty((n, out_f, in_f), dtype=FP8_DTYPE, device=w.device)
    scale_inv = torch.empty((n, ob, ib), dtype=torch.float32, device=w.device)
    step = max(1, STEP_ELEMS // (b0 * in_f))                           # row blocks per step
    for i in range(n):
        for r0 in range(0, ob, step):
            r1 = min(ob, r0 + step)
            tiles = flat[i, r0 * b0:r1 * b0].float().reshape(r1 - r0, b0, ib, b1)   # [rb, b0, ib, b1]
            scale, inv = block_scale_inv(tiles.abs().amax(dim=(-3, -1)))          # [rb, ib]
            scaled = tiles * scale[:, None, :, None]
            q[i, r0 * b0:r1 * b0] = scaled.clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE).reshape(-1, in_f)
            scale_inv[i, r0:r1] = inv
    return q.reshape(w.shape), scale_inv.reshape(*lead, ob, ib)


def dequantize_fp8_block(q: Tensor, scale_inv: Tensor, dtype: torch.dtype = torch.bfloat16,
                         block: tuple[int, int] = WEIGHT_BLOCK) -> Tensor:
    """q float8 [..., out, in] and weight_scale_inv [..., ceil(out/b0), ceil(in/b1)] -> [..., out, in].

    `block` is the config's `weight_block_size` (the engines read it from there too: the grid alone
    is ambiguous). A ragged last block (e.g. DeepSeek-V3's 576-row kv_a_proj_with_mqa, 5 scale
    rows) uses its row of scales."""
    b0, b1 = block
    out_f, in_f = q.shape[-2:]
    if tuple(scale_inv.shape[-2:]) != (-(-out_f // b0), -(-in_f // b1)):
        raise NumericsError(f"FP8 block: scale grid {tuple(scale_inv.shape)} does not tile weight "
                            f"{tuple(q.shape)} in {b0}x{b1} blocks")
    s = scale_inv.float().repeat_interleave(b0, dim=-2)[..., :out_f, :].repeat_interleave(b1, dim=-1)[..., :in_f]
    return (q.float() * s).to(dtype)


__all__ = ["BLOCK_IN", "BLOCK_OUT", "E4M3_MAX", "WEIGHT_BLOCK", "block_scale_inv", "check_block_shape",
           "dequantize_fp8_block", "quantize_fp8_block"]
