"""MXFP4 numerics: bit-exact to llm-compressor's MXFP4 preset (compressed-tensors ``mxfp4-pack-quantized``,
committed fixtures from `benchmarks/ct_reference_fixtures.py`), the GPT-OSS native form read back by
transformers' own dequantizer, the two E8M0 rounding rules, any leading dims, and bad input."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from numerics_helpers import CUDA, FIXTURES, REPO_ROOT, bits, sqnr_db
from safetensors.torch import load_file

from quantgate.exporter.numerics.common import NumericsError
from quantgate.exporter.numerics.e2m1 import E2M1_GRID
from quantgate.exporter.numerics.mxfp4 import (
    MX_BLOCK,
    dequantize_mxfp4,
    e8m0_to_float,
    mxfp4_from_native,
    mxfp4_native_layout,
    quantize_mxfp4_ct,
    quantize_mxfp4_native,
)

CT_FIXTURES = FIXTURES / "compressed_tensors"
TAGS = ("bf16", "fp16", "fp32")
LAB_PYTHON = Path(os.environ.get("QUANTGATE_CT_LAB", "/work/labs/ct")) / "bin" / "python"


def _cases(tag: str) -> list[tuple[str, torch.Tensor, dict[str, torch.Tensor]]]:
    src = load_file(CT_FIXTURES / f"source_{tag}.safetensors")
    ref = load_file(CT_FIXTURES / f"mxfp4_{tag}.safetensors")
    return [(name.removesuffix(".weight"), w, ref) for name, w in sorted(src.items())]


def _transformers_dequant(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """transformers' GPT-OSS dequantizer: [E, out, in/32, 16] -> [E, in, out] (its transposed layout)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)


@pytest.mark.parametrize("tag", TAGS)
def test_ct_bit_exact_to_llm_compressor(tag: str) -> None:
    for module, w, ref in _cases(tag):
        packed, scale = quantize_mxfp4_ct(w)
        assert bits(packed).equal(bits(ref[f"{module}.weight_packed"])), module
        assert bits(scale).equal(bits(ref[f"{module}.weight_scale"])), module
        assert packed.shape == (*w.shape[:-1], w.shape[-1] // 2) and scale.dtype == torch.uint8


def test_fixtures_pin_the_edge_rules() -> None:
    """The planted blocks exercise what compressed-tensors does at the edges (so the test above covers them)."""
    _, w16, ref16 = _cases("fp16")[0]
    refbf = _cases("bf16")[0][2]
    scale16 = ref16["model.layers.0.mlp.down_proj.weight_scale"]
    scalebf = refbf["model.layers.0.mlp.down_proj.weight_scale"]
    assert int(scalebf[-1, -1]) == 0        # zero block, bf16: 2**-127 is representable -> byte 0
    assert int(scale16[-1, -1]) == 127      # zero block, fp16: 2**-127 underflows to 0 -> scale 1.0
    assert int(scale16[1, 0]) == 127        # fp16 block of 1e-30 (zeros after the cast): same
    # Block maxima at the round_to_power_2 edge (rows 3.. of the planted weights): significand 1.75
    # rounds up (exponent + 1), just below 1.75 rounds down.
    amax = w16[3:5, :32].float().abs().amax(dim=1)
    floor = torch.floor(torch.log2(amax))
    assert (amax / 2.0**floor).tolist() == [1.75, 1.7421875] and floor.tolist() == [-4.0, -3.0]
    assert [int(e) - 127 for e in scale16[3:5, 0]] == [-4 + 1 - 2, -3 - 2]   # 2 = floor(log2(6))


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_leading_dims_equal_per_matrix(device: str) -> None:
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(3, 40, 96, generator=g) * 0.02).to(torch.bfloat16).to(device)
    for quantize in (quantize_mxfp4_ct, quantize_mxfp4_native):
        a, b = quantize(w)
        parts = [quantize(w[e]) for e in range(3)]
        assert bits(a).equal(bits(torch.stack([p[0] for p in parts])))
        assert bits(b).equal(bits(torch.stack([p[1] for p in parts])))
    packed, scale = quantize_mxfp4_ct(w.reshape(3, 2, 20, 96))
    assert packed.shape == (3, 2, 20, 48) and scale.shape == (3, 2, 20, 3)
    deq = dequantize_mxfp4(packed, scale, torch.float32)
    assert deq.shape == (3, 2, 20, 96)
    assert bits(deq.reshape(3, 40, 96)[1]).equal(bits(dequantize_mxfp4(*quantize_mxfp4_ct(w[1]), torch.float32)))


@pytest.mark.parametrize("quantize", [quantize_mxfp4_ct, quantize_mxfp4_native], ids=["ct", "native"])
def test_round_trip_within_one_scale_step(quantize) -> None:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 256, generator=g).to(torch.bfloat16) * 0.03
    a, scale = quantize(w)
    packed = mxfp4_from_native(a, scale)[0] if a.ndim == w.ndim + 1 else a
    deq = dequantize_mxfp4(packed, scale, torch.float32)
    step = e8m0_to_float(scale).repeat_interleave(MX_BLOCK, dim=-1)
    # E2M1 spacing is at most 2 units (4 -> 6): rounding moves a value by <= 1 unit, and
    # compressed-tensors' clipping of (6, 7) units to 6 also by < 1 unit.
    assert ((deq - w.float()).abs() <= step).all()
    assert sqnr_db(w.float(), deq) > 15.0


def test_native_rounds_the_scale_up_and_never_clips() -> None:
    """triton_kernels ROUND_UP: 2**(e-128) < fp32(amax / 6) <= 2**(e-127) for every non-zero block."""
    g = torch.Generator().manual_seed(9)
    w = (torch.randn(128, 512, generator=g) * torch.logspace(-6, 3, 128).unsqueeze(1)).to(torch.bfloat16)
    blocks, scale = quantize_mxfp4_native(w)
    amax = w.float().reshape(128, -1, MX_BLOCK).abs().amax(-1)
    d = amax / 6.0
    s = e8m0_to_float(scale)
    assert ((d <= s) & (d > s / 2)).all()
    deq = dequantize_mxfp4(*mxfp4_from_native(blocks, scale), torch.float32).reshape(128, -1, MX_BLOCK)
    assert (deq.abs().amax(-1) >= amax - s).all()                   # the block max is never clipped


def test_native_and_ct_differ_where_documented() -> None:
    """A block max with significand in (1.5, 1.75): compressed-tensors rounds the power of two DOWN
    (max lands at 6.4 units, clipped to 6), triton_kernels rounds amax/6 UP (max at 3.2 units);
    and a -0.0 weight is code 8 in the native form (sign bit), code 0 in compressed-tensors'."""
    w = torch.zeros(1, 32, dtype=torch.bfloat16)
    w[0, 0], w[0, 1], w[0, 2] = 1.6, -0.0, 0.5
    ct_packed, ct_scale = quantize_mxfp4_ct(w)
    nat_blocks, nat_scale = quantize_mxfp4_native(w)
    assert int(ct_scale) == 127 - 2 and int(nat_scale) == 127 - 1
    assert int(ct_packed[0, 0]) & 0x0F == 7                         # 1.6 / 0.25 = 6.4 -> clipped to 6.0
    assert int(nat_blocks[0, 0, 0]) & 0x0F == 5                     # 1.6 / 0.5 = 3.2 -> 3.0
    assert int(ct_packed[0, 0]) >> 4 == 0 and int(nat_blocks[0, 0, 0]) >> 4 == 8


def test_native_layout_read_by_transformers() -> None:
    """The native blocks/scales, dequantized by transformers' own `convert_moe_packed_tensors` (lo
    nibble = even element, LUT, ldexp), equal our dequantization of the same bytes."""
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(2, 48, 128, generator=g) * 0.05).to(torch.bfloat16)        # [E, out, in]
    blocks, scales = quantize_mxfp4_native(w)
    assert blocks.shape == (2, 48, 4, 16) and scales.shape == (2, 48, 4) and blocks.dtype == torch.uint8
    theirs = _transformers_dequant(blocks, scales)                                 # [E, in, out]
    ours = dequantize_mxfp4(*mxfp4_from_native(blocks, scales), torch.bfloat16)
    assert torch.equal(theirs, ours.transpose(1, 2))
    # The compressed-tensors form is the same byte order: reshaped, transformers reads it identically.
    packed, scale = quantize_mxfp4_ct(w)
    ct_native = mxfp4_native_layout(packed, scale)
    assert torch.equal(_transformers_dequant(*ct_native), dequantize_mxfp4(packed, scale).transpose(1, 2))
    assert bits(mxfp4_from_native(*ct_native)[0]).equal(bits(packed))


def test_dequantize_reads_codes_and_exponents() -> None:
    codes = torch.arange(32, dtype=torch.uint8) % 16
    packed = (codes[0::2] | (codes[1::2] << 4)).reshape(1, 16)
    out = dequantize_mxfp4(packed, torch.tensor([[127 + 3]], dtype=torch.uint8), torch.float32)
    grid = torch.tensor(E2M1_GRID + tuple(-v for v in E2M1_GRID))
    assert torch.equal(out[0], torch.cat([grid, grid]) * 8.0)


@pytest.mark.parametrize(("w", "match"), [
    (torch.full((4, 64), float("nan")), "NaN or Inf"),
    (torch.tensor([[float("inf")] + [0.0] * 31]), "NaN or Inf"),
    (torch.zeros(4, 48), "not divisible by 32"),
    (torch.zeros(4, 64, dtype=torch.int32), "dtype"),
    (torch.zeros(64), "expected a non-empty weight"),
    (torch.zeros(0, 64), "expected a non-empty weight"),
    (torch.full((1, 32), 3.0e38, dtype=torch.bfloat16), "largest finite"),
])
def test_bad_input_is_a_clear_error(w: torch.Tensor, match: str) -> None:
    with pytest.raises(NumericsError, match=match):
        quantize_mxfp4_ct(w)


def test_bad_packed_shapes_are_clear_errors() -> None:
    packed = torch.zeros(4, 32, dtype=torch.uint8)
    with pytest.raises(NumericsError, match="does not match packed weight"):
        dequantize_mxfp4(packed, torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(NumericsError, match="uint8"):
        dequantize_mxfp4(packed, torch.zeros(4, 2))
    with pytest.raises(NumericsError, match="expected a packed weight"):
        dequantize_mxfp4(torch.zeros(4, 24, dtype=torch.uint8), torch.zeros(4, 1, dtype=torch.uint8))
    with pytest.raises(NumericsError, match="do not match scales"):
        mxfp4_from_native(torch.zeros(4, 2, 8, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))
    with pytest.raises(NumericsError, match="not divisible by 32"):
        quantize_mxfp4_native(torch.zeros(2, 16))


@pytest.mark.skipif(not LAB_PYTHON.exists(), reason=f"no compressed-tensors lab venv at {LAB_PYTHON} "
                    "(see benchmarks/ct_reference_fixtures.py for how to make it)")
def test_live_producer_on_fresh_weights(tmp_path: Path) -> None:
    """llm-compressor itself, on weights of another seed: both schemes still match bit for bit."""
    from quantgate.exporter.numerics.fp8_block_ct import quantize_fp8_block_ct

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run([str(LAB_PYTHON), "-m", "benchmarks.ct_reference_fixtures", "--out", str(tmp_path),
                    "--seed", "7"], cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=600)
    for tag in TAGS:
        src = load_file(tmp_path / f"source_{tag}.safetensors")
        mx = load_file(tmp_path / f"mxfp4_{tag}.safetensors")
        fb = load_file(tmp_path / f"fp8_block_{tag}.safetensors")
        for name, w in src.items():
            module = name.removesuffix(".weight")
            packed, scale = quantize_mxfp4_ct(w)
            assert bits(packed).equal(bits(mx[f"{module}.weight_packed"])), (tag, module)
            assert bits(scale).equal(bits(mx[f"{module}.weight_scale"])), (tag, module)
            q, s = quantize_fp8_block_ct(w)
            assert bits(q).equal(bits(fb[f"{module}.weight"])), (tag, module)
            assert bits(s).equal(bits(fb[f"{module}.weight_scale"])), (tag, module)
