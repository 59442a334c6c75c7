"""NVFP4 and FP8 numerics on stacks `[..., out, in]`: one implementation serves one matrix, the GPU
batch (one global scale per matrix) and a 3-D expert tensor (one shared scale), bit for bit the same
as quantizing each matrix alone."""

from __future__ import annotations

import pytest
import torch

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.fp8 import dequantize_fp8, fp8_scale, quantize_fp8
from quantgate.exporter.numerics.modes import MODELOPT_CPU, MODELOPT_CUDA
from quantgate.exporter.numerics.nvfp4 import (
    dequantize_nvfp4,
    matrix_amax,
    nvfp4_global_scale,
    nvfp4_global_scales,
    quantize_nvfp4,
)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def stack(dtype: torch.dtype, lead: tuple[int, ...] = (2, 3), out_f: int = 24, in_f: int = 64) -> torch.Tensor:
    """Matrices of very different magnitudes (so per-matrix and shared scales differ), one all zero."""
    g = torch.Generator().manual_seed(3)
    n = 1
    for d in lead:
        n *= d
    spread = torch.logspace(-3, 1, n).view(*lead, 1, 1)
    w = torch.randn(*lead, out_f, in_f, generator=g) * spread
    w.reshape(n, out_f, in_f)[1] = 0.0
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numerics", [MODELOPT_CUDA, MODELOPT_CPU])
def test_nvfp4_stack_equals_each_matrix(dtype: torch.dtype, numerics: str) -> None:
    w = stack(dtype)
    flat = w.reshape(-1, *w.shape[-2:])
    packed, block, ws2 = quantize_nvfp4(w, numerics=numerics)          # each matrix its own scale
    assert packed.shape == (2, 3, 24, 32) and block.shape == (2, 3, 24, 4) and ws2.shape == (2, 3)
    per_matrix = nvfp4_global_scales(matrix_amax(w), numerics)
    assert torch.equal(ws2, per_matrix)
    for i, m in enumerate(flat):
        one = quantize_nvfp4(m, numerics=numerics)
        assert torch.equal(packed.reshape(-1, 24, 32)[i], one[0])
        assert torch.equal(bits(block.reshape(-1, 24, 4)[i]), bits(one[1]))
        assert torch.equal(ws2.reshape(-1)[i], one[2]) and torch.equal(one[2], nvfp4_global_scale(m.abs().max(), numerics))
    again = quantize_nvfp4(w, ws2, numerics)                           # the same scales, given per matrix
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(again, (packed, block, ws2)))
    deq = dequantize_nvfp4(packed, block, ws2, dtype=torch.float32)
    for i, m in enumerate(flat):
        one = quantize_nvfp4(m, numerics=numerics)
        assert torch.equal(deq.reshape(-1, 24, 64)[i], dequantize_nvfp4(*one, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_nvfp4_shared_scale_over_a_transposed_expert_tensor(dtype: torch.dtype) -> None:
    """GPT-OSS / Llama4 store experts [E, in, out]: the stack is quantized as [E, out, in] in one call."""
    w = stack(dtype, lead=(4,), out_f=32, in_f=48)                      # [E, out, in]
    stored = w.transpose(-1, -2).contiguous()                           # [E, in, out] as on disk
    shared = nvfp4_global_scale(stored.abs().max())
    packed, block, ws2 = quantize_nvfp4(stored.transpose(-1, -2), shared)
    assert ws2.shape == (4,) and bool((ws2 == shared).all())
    for e in range(4):
        one = quantize_nvfp4(stored[e].t().contiguous(), shared)
        assert torch.equal(packed[e], one[0]) and torch.equal(bits(block[e]), bits(one[1]))


def test_nvfp4_given_scales_are_checked() -> None:
    w = stack(torch.bfloat16, lead=(3,))
    with pytest.raises(NumericsError, match="2 global scales for 3"):
        quantize_nvfp4(w, torch.ones(2))
    small = nvfp4_global_scales(matrix_amax(w)) / 2
    with pytest.raises(NumericsError, match="too small"):
        quantize_nvfp4(w, small)
    with pytest.raises(NumericsError, match="finite and > 0"):
        quantize_nvfp4(w, torch.tensor([1.0, -1.0, 1.0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numerics", [MODELOPT_CUDA, MODELOPT_CPU])
def test_fp8_stack_equals_each_matrix(dtype: torch.dtype, numerics: str) -> None:
    w = stack(dtype)
    flat = w.reshape(-1, *w.shape[-2:])
    q, scale = quantize_fp8(w, numerics=numerics)
    assert q.shape == w.shape and scale.shape == (2, 3)
    for i, m in enumerate(flat):
        q1, s1 = quantize_fp8(m, numerics=numerics)
        assert torch.equal(bits(q.reshape(flat.shape)[i]), bits(q1)) and torch.equal(scale.reshape(-1)[i], s1)
    shared = fp8_scale(w.abs().max().float(), numerics)                # one scale for the whole stack
    qs, ss = quantize_fp8(w, shared, numerics)
    assert ss.shape == ()
    for i, m in enumerate(flat):
        assert torch.equal(bits(qs.reshape(flat.shape)[i]), bits(quantize_fp8(m, shared, numerics)[0]))
    deq = dequantize_fp8(q, scale, dtype=torch.float32)
    for i, m in enumerate(flat):
        assert torch.equal(deq.reshape(flat.shape)[i], dequantize_fp8(*quantize_fp8(m, numerics=numerics),
                                                                      dtype=torch.float32))
