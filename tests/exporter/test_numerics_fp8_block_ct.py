"""FP8 128x128 block numerics in compressed-tensors' form: bit-exact to llm-compressor's FP8_BLOCK preset
(committed fixtures from `benchmarks/ct_reference_fixtures.py`; the live producer runs in
test_numerics_mxfp4.py), ragged edges, any leading dims, dequantization and bad input."""

from __future__ import annotations

import pytest
import torch
from numerics_helpers import CUDA, FIXTURES, bits
from safetensors.torch import load_file

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.fp8_block import FP8_DTYPE, quantize_fp8_block
from quantgate.exporter.numerics.fp8_block_ct import (
    ct_block_scale,
    dequantize_fp8_block_ct,
    quantize_fp8_block_ct,
)

CT_FIXTURES = FIXTURES / "compressed_tensors"
TAGS = ("bf16", "fp16", "fp32")


def _cases(tag: str) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    src = load_file(CT_FIXTURES / f"source_{tag}.safetensors")
    ref = load_file(CT_FIXTURES / f"fp8_block_{tag}.safetensors")
    return [(name.removesuffix(".weight"), w, ref) for name, w in sorted(src.items())]


@pytest.mark.parametrize("tag", TAGS)
def test_bit_exact_to_llm_compressor(tag: str) -> None:
    for module, w, ref in _cases(tag):
        q, scale = quantize_fp8_block_ct(w)
        assert q.dtype == FP8_DTYPE and scale.dtype == w.dtype          # the scale keeps the weight's dtype
        assert bits(q).equal(bits(ref[f"{module}.weight"])), module
        assert bits(scale).equal(bits(ref[f"{module}.weight_scale"])), module


def test_fixtures_pin_the_edge_rules() -> None:
    """Ragged grids, the eps scale of an all-zero tile, and +0 (not -0) where a negative weight's
    bf16 quotient underflows to -0.0 (the symmetric zero point is still added)."""
    for module, w, ref in _cases("bf16"):
        scale = ref[f"{module}.weight_scale"]
        assert tuple(scale.shape) == (-(-w.shape[0] // 128), -(-w.shape[1] // 128)), module
    _, down, ref = _cases("bf16")[0]
    assert down.shape == (160, 288)                                     # ragged in both dims
    assert float(ref["model.layers.0.mlp.down_proj.weight_scale"][1, 2]) == torch.finfo(torch.bfloat16).eps
    # Row 1 holds +-1e-30 in the tile of row 0's 1e30 block: every quotient underflows in bf16.
    assert (down[1, :32] < 0).any() and (down[1, :32].abs() < 1e-29).all()
    assert (ref["model.layers.0.mlp.down_proj.weight"][1, :32].view(torch.uint8) == 0).all()


def test_differs_from_transformers_fine_grained_fp8() -> None:
    """Same blocks, another producer: transformers' scale_inv is fp32 448/amax inverted, its quotient
    is not rounded to bf16 first. The two must not be confused (hence two quantizers)."""
    g = torch.Generator().manual_seed(2)
    w = (torch.randn(256, 256, generator=g) * 0.02).to(torch.bfloat16)
    q_ct, s_ct = quantize_fp8_block_ct(w)
    q_hf, s_hf = quantize_fp8_block(w)
    assert s_ct.dtype == torch.bfloat16 and s_hf.dtype == torch.float32
    assert not bits(q_ct).equal(bits(q_hf))
    assert ((q_ct.float() - q_hf.float()).abs() <= q_hf.float().abs() / 8 + 2**-9).all()   # one e4m3 step apart


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_leading_dims_equal_per_matrix(device: str) -> None:
    g = torch.Generator().manual_seed(4)
    w = (torch.randn(3, 200, 136, generator=g) * 0.05).to(torch.bfloat16).to(device)
    q, scale = quantize_fp8_block_ct(w)
    assert q.shape == w.shape and scale.shape == (3, 2, 2)
    parts = [quantize_fp8_block_ct(w[e]) for e in range(3)]
    assert bits(q).equal(bits(torch.stack([p[0] for p in parts])))
    assert bits(scale).equal(bits(torch.stack([p[1] for p in parts])))
    q4, s4 = quantize_fp8_block_ct(w.reshape(3, 1, 200, 136))
    assert bits(q4).equal(bits(q)) and s4.shape == (3, 1, 2, 2)


def test_dequantize_round_trip() -> None:
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(300, 260, generator=g) * 0.05).to(torch.bfloat16)
    q, scale = quantize_fp8_block_ct(w)
    deq = dequantize_fp8_block_ct(q, scale)
    assert deq.dtype == torch.bfloat16                                  # the scale's dtype by default
    full = scale.float().repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :260]
    assert torch.equal(deq, (q.float() * full).to(torch.bfloat16))
    err = (dequantize_fp8_block_ct(q, scale, torch.float32) - w.float()).abs()
    assert (err <= w.float().abs() / 16 + full * 2**-9 + 1e-9).all()      # half an e4m3 step (+ bf16 rounding)


def test_block_scale_is_a_division_in_the_weight_dtype() -> None:
    amax = torch.tensor([0.0, 1.0, 0.3, 1e-3], dtype=torch.bfloat16)
    expected = amax / torch.tensor(448.0, dtype=torch.bfloat16)
    expected[0] = torch.finfo(torch.bfloat16).eps
    assert bits(ct_block_scale(amax)).equal(bits(expected))


@pytest.mark.parametrize(("w", "match"), [
    (torch.full((4, 64), float("nan")), "NaN or Inf"),
    (torch.tensor([[float("-inf"), 1.0]]), "NaN or Inf"),
    (torch.zeros(4, 64, dtype=torch.int8), "dtype"),
    (torch.zeros(64), "non-empty weight"),
    (torch.zeros(3, 0), "non-empty weight"),
])
def test_bad_input_is_a_clear_error(w: torch.Tensor, match: str) -> None:
    with pytest.raises(NumericsError, match=match):
        quantize_fp8_block_ct(w)


def test_dequantize_rejects_a_grid_that_does_not_tile() -> None:
    q, scale = quantize_fp8_block_ct(torch.ones(130, 128))
    with pytest.raises(NumericsError, match="does not tile"):
        dequantize_fp8_block_ct(q, scale[:1])
