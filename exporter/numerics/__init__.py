"""Number formats for the exporter: pure torch quantize / dequantize / pack, device agnostic.

- `nvfp4`: NVFP4 (ModelOpt 0.47 bit-exact), plus compressed-tensors global-scale conversion.
- `fp8`: FP8 E4M3 per-tensor (ModelOpt 0.47 bit-exact) and static activation scales.
- `mxfp4`: MXFP4 (E2M1 + E8M0 per 32): compressed-tensors ``mxfp4-pack-quantized`` (llm-compressor
  bit-exact) and the GPT-OSS native ``*_blocks`` / ``*_scales`` form (triton_kernels ROUND_UP scales).
- `fp8_block_ct`: FP8 128x128 blocks as compressed-tensors stores them (llm-compressor ``FP8_BLOCK``).
- `int4`: W4A16 in compressed-tensors ``pack-quantized`` layout (compressed-tensors bit-exact).
- `int8`: W8A8-int8 per-channel weights and the shared symmetric-int core.
- `e2m1`: FP4 element codes and nibble packing; `common`: checks, chunking, `NumericsError`.
"""

from __future__ import annotations

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.fp8 import (
    E4M3_MAX,
    activation_scale,
    dequantize_fp8,
    fp8_scale,
    quantize_fp8,
)
from quantgate.exporter.numerics.fp8_block_ct import dequantize_fp8_block_ct, quantize_fp8_block_ct
from quantgate.exporter.numerics.int4 import (
    W4A16_GROUP_SIZE,
    dequantize_w4a16,
    pack_int4,
    quantize_w4a16,
    unpack_int4,
)
from quantgate.exporter.numerics.int8 import dequantize_w8a8_int8, quantize_w8a8_int8
from quantgate.exporter.numerics.mxfp4 import (
    MX_BLOCK,
    dequantize_mxfp4,
    mxfp4_from_native,
    mxfp4_native_layout,
    quantize_mxfp4_ct,
    quantize_mxfp4_native,
)
from quantgate.exporter.numerics.nvfp4 import (
    BLOCK,
    ct_global_scale,
    dequantize_nvfp4,
    modelopt_global_scale,
    nvfp4_global_scale,
    nvfp4_input_scale,
    quantize_nvfp4,
    quantize_nvfp4_experts,
    shared_global_scale,
    weight_amax,
)

__all__ = [
    "BLOCK",
    "E4M3_MAX",
    "MX_BLOCK",
    "W4A16_GROUP_SIZE",
    "NumericsError",
    "activation_scale",
    "ct_global_scale",
    "dequantize_fp8",
    "dequantize_fp8_block_ct",
    "dequantize_mxfp4",
    "dequantize_nvfp4",
    "dequantize_w4a16",
    "dequantize_w8a8_int8",
    "fp8_scale",
    "modelopt_global_scale",
    "mxfp4_from_native",
    "mxfp4_native_layout",
    "nvfp4_global_scale",
    "nvfp4_input_scale",
    "pack_int4",
    "quantize_fp8",
    "quantize_fp8_block_ct",
    "quantize_mxfp4_ct",
    "quantize_mxfp4_native",
    "quantize_nvfp4",
    "quantize_nvfp4_experts",
    "quantize_w4a16",
    "quantize_w8a8_int8",
    "shared_global_scale",
    "unpack_int4",
    "weight_amax",
]
