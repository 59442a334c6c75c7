"""NVFP4 numerics: bit-exact to ModelOpt 0.47's own exports, plus rounding, packing and edge cases."""

from __future__ import annotations

import json
import math

import pytest
import torch
from numerics_helpers import CUDA, EXPORTS, FIXTURES, bits, sqnr_db
from safetensors.torch import load_file

from quantgate.exporter.numerics import common
from quantgate.exporter.numerics.e2m1 import E2M1_GRID, e2m1_decode, e2m1_encode, pack_nibbles, unpack_nibbles
from quantgate.exporter.numerics.modes import MODELOPT_CPU, NUMERICS_MODES
from quantgate.exporter.numerics.nvfp4 import (
    BLOCK,
    BLOCK_SCALE_MIN,
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


def _modelopt_cast_fp4(x: torch.Tensor) -> torch.Tensor:
    """Transcription of ModelOpt 0.47 ``NVFP4QTensor._cast_fp4``: the independent oracle."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    sign = (x < 0).to(torch.uint8)
    a = x.abs()
    ordinal = torch.searchsorted(bounds, a, out_int32=True).to(torch.uint8)
    bump = torch.any(a.unsqueeze(-1) == bounds[[1, 3, 5]], dim=-1).to(torch.uint8)
    return (sign << 3) + ordinal + bump


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize(("suffix", "dtype"), EXPORTS)
def test_bit_exact_to_modelopt_export(suffix: str, dtype: torch.dtype, device: str) -> None:
    fx = load_file(FIXTURES / f"modelopt_nvfp4_fixture{suffix}.safetensors")
    w = fx["input_weight"].to(dtype).to(device)  # stored as f32, holding bf16-representable values
    packed, block_scale, scale_2 = quantize_nvfp4(w, numerics=MODELOPT_CPU)  # ModelOpt run on the CPU
    assert packed.device.type == device and packed.dtype == torch.uint8 and packed.shape == (32, 32)
    assert block_scale.dtype == torch.float8_e4m3fn and block_scale.shape == (32, 4)
    assert scale_2.dtype == torch.float32 and scale_2.shape == ()
    assert torch.equal(bits(packed), bits(fx["weight"]))
    assert torch.equal(bits(block_scale), bits(fx["weight_scale"]))
    assert torch.equal(bits(scale_2), bits(fx["weight_scale_2"]))
    input_scale = nvfp4_input_scale(fx["calib_input_amax"].to(device), MODELOPT_CPU)
    assert torch.equal(bits(input_scale), bits(fx["input_scale"]))
    deq = dequantize_nvfp4(packed, block_scale, scale_2, dtype=torch.float32)
    assert torch.equal(bits(deq), bits(fx["dequantized"]))


@pytest.mark.parametrize(("suffix", "dtype"), EXPORTS)
def test_fixture_numbers_match_the_lab_record(suffix: str, dtype: torch.dtype) -> None:
    """The values the lab quoted (byte 0, first block scale, global scale) come out of our code too."""
    record = json.loads((FIXTURES / "modelopt_fixture_results.json").read_text())["results"]
    expected = record["f32" if suffix else "bf16"]["nvfp4"]
    w = load_file(FIXTURES / f"modelopt_nvfp4_fixture{suffix}.safetensors")["input_weight"].to(dtype)
    packed, block_scale, scale_2 = quantize_nvfp4(w, numerics=MODELOPT_CPU)
    assert int(packed[0, 0]) == expected["byte0"]
    assert int(packed[0, 0]) & 0x0F == expected["low_nibble"]
    assert int(packed[0, 0]) >> 4 == expected["high_nibble"]
    assert float(block_scale[0, 0].float()) == expected["scale_blk0"]
    assert float(scale_2) == expected["weight_scale_2"] == expected["amax_over_2688"]
    assert float(scale_2) == float(torch.tensor(expected["amax"]) / torch.tensor(2688.0))


def test_e2m1_rounding_table() -> None:
    """Round to nearest, ties to the even code, saturate at 6; the sign bit only for x < 0."""
    cases = {
        0.0: 0, 0.24: 0, 0.25: 0, 0.26: 1, 0.5: 1, 0.74: 1, 0.75: 2, 1.0: 2, 1.25: 2, 1.26: 3,
        1.5: 3, 1.75: 4, 2.0: 4, 2.5: 4, 2.51: 5, 3.0: 5, 3.49: 5, 3.5: 6, 4.0: 6, 5.0: 6,
        5.01: 7, 6.0: 7, 6.5: 7, 100.0: 7, math.inf: 7,
    }  # fmt: skip
    x = torch.tensor(list(cases), dtype=torch.float32)
    expected = torch.tensor(list(cases.values()), dtype=torch.uint8)
    assert torch.equal(e2m1_encode(x), expected)
    negative = e2m1_encode(-x[1:])  # -0.0 is handled separately below
    assert torch.equal(negative, expected[1:] | 0b1000)


def test_e2m1_sign_of_zero() -> None:
    """-0.0 is code 0 (no sign bit), a tiny negative rounds to -0 = code 8, as ModelOpt does;
    ModelOpt's decode table maps code 8 back to +0.0, which its dequantized output shows."""
    codes = e2m1_encode(torch.tensor([-0.0, 0.0, -0.1, -1e-30, 0.1]))
    assert codes.tolist() == [0, 0, 8, 8, 0]
    assert bits(e2m1_decode(torch.tensor([0, 8], dtype=torch.uint8))).tolist() == [0] * 8


def test_e2m1_matches_modelopt_cast_on_every_midpoint_and_random_values() -> None:
    grid = torch.tensor(E2M1_GRID)
    mids = (grid[1:] + grid[:-1]) / 2
    nudged = torch.cat([mids, torch.nextafter(mids, grid[1:]), torch.nextafter(mids, grid[:-1]), grid])
    rand = torch.randn(100_000, generator=torch.Generator().manual_seed(0)) * 3
    x = torch.cat([nudged, -nudged, rand, torch.tensor([7.0, -7.0, 1e9])])
    assert torch.equal(e2m1_encode(x), _modelopt_cast_fp4(x.clone()))


def test_e2m1_is_nearest_grid_value() -> None:
    """Away from exact midpoints, the decoded value is the closest grid value (float64 check)."""
    x = torch.rand(50_000, generator=torch.Generator().manual_seed(1), dtype=torch.float32) * 14 - 7
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
    signed = torch.cat([grid, -grid])
    nearest = signed[(x.double().unsqueeze(-1) - signed).abs().argmin(-1)]
    decoded = e2m1_decode(e2m1_encode(x)).double()
    assert torch.equal((x.double() - decoded).abs(), (x.double() - nearest).abs())


def test_packing_puts_element_zero_in_the_low_nibble() -> None:
    codes = torch.tensor([[0x1, 0x2, 0x3, 0xF, 0x8, 0x0]], dtype=torch.uint8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0x21, 0xF3, 0x08]]
    assert torch.equal(unpack_nibbles(packed), codes)


def test_hand_built_weight_packs_as_expected() -> None:
    """Block amax 6 -> weight_scale_2 = 6/2688, block scale 448, so values are their own codes."""
    w = torch.zeros(1, BLOCK, dtype=torch.bfloat16)
    w[0, :4] = torch.tensor([0.5, -1.0, 6.0, -3.0])
    packed, block_scale, scale_2 = quantize_nvfp4(w)
    assert float(block_scale.float()) == 448.0
    assert float(scale_2) == pytest.approx(6 / 2688, rel=1e-7)
    # codes: 0.5 -> 1, -1.0 -> 8|2, 6.0 -> 7, -3.0 -> 8|5; element 0 in the low nibble
    assert packed[0, :2].tolist() == [0x1 | (0xA << 4), 0x7 | (0xD << 4)]
    assert packed[0, 2:].tolist() == [0] * 6


def test_all_zero_weight() -> None:
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    packed, block_scale, scale_2 = quantize_nvfp4(w)
    assert not packed.any()
    assert torch.equal(block_scale.float(), torch.ones(8, 4))
    assert float(scale_2) == 1.0  # positive (ModelOpt would emit 0/0 = NaN block scales here)
    assert not dequantize_nvfp4(packed, block_scale, scale_2).any()


def test_zero_block_scale_is_one_and_tiny_block_clamps_to_smallest_e4m3() -> None:
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(2))
    w[1, 16:32] = 0.0  # one all-zero block
    w[2, 32:48] = 1e-6  # a block far below the tensor amax: its raw scale underflows e4m3
    packed, block_scale, scale_2 = quantize_nvfp4(w)
    assert float(block_scale[1, 1].float()) == 1.0
    assert not packed[1, 8:16].any()
    raw = 1e-6 / (6 * float(scale_2))
    assert raw < BLOCK_SCALE_MIN / 2  # a bare cast would give 0 and then 0/0 codes
    assert float(block_scale[2, 2].float()) == BLOCK_SCALE_MIN
    assert torch.isfinite(dequantize_nvfp4(packed, block_scale, scale_2, torch.float32)).all()


def test_values_above_six_block_scales_saturate() -> None:
    """The e4m3 cast can round a block scale down; the block max then saturates at code 7 (6.0)."""
    w = torch.full((2, BLOCK), 0.1)
    w[0, 3] = -230.84 / 448  # raw block scale 230.84 rounds to e4m3 224 (lab §6 row 0 example)
    w[1, 0] = 1.0  # the tensor amax lives in another block
    packed, block_scale, scale_2 = quantize_nvfp4(w)
    assert float(block_scale[0, 0].float()) == 224.0
    scaled_max = float(w[0].abs().max()) / (224.0 * float(scale_2))
    assert scaled_max > 6.1
    codes = unpack_nibbles(packed)[0]
    assert int(codes[3]) == 0b1000 | 7  # saturated to -6.0, not wrapped into another code


def test_in_features_not_divisible_by_16_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible by 16"):
        quantize_nvfp4(torch.randn(4, 40))
    with pytest.raises(common.NumericsError, match="2-D"):
        quantize_nvfp4(torch.randn(64))
    with pytest.raises(common.NumericsError, match="dtype"):
        quantize_nvfp4(torch.ones(4, 16, dtype=torch.int32))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_weight_is_refused(bad: float) -> None:
    w = torch.randn(4, 32)
    w[3, 17] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_nvfp4(w)


def test_shared_weight_scale_2_across_a_fused_group() -> None:
    """q/k/v (or gate/up) share one weight_scale_2 computed from the group's max amax."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(32, 64, generator=gen) * s for s in (1.0, 3.0, 0.5))
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    shared = shared_global_scale([q, k, v])
    assert torch.equal(shared, nvfp4_global_scale(weight_amax(k)))
    outs = [quantize_nvfp4(t, weight_scale_2=shared) for t in (q, k, v)]
    assert all(torch.equal(o[2], shared) for o in outs)
    # k holds the max amax: sharing changes nothing for it
    assert all(torch.equal(a, b) for a, b in zip(outs[1], quantize_nvfp4(k)))
    for t, (packed, block_scale, scale_2) in zip((q, k, v), outs):
        assert sqnr_db(t, dequantize_nvfp4(packed, block_scale, scale_2, torch.float32)) > 19.0
    with pytest.raises(ValueError, match="too small"):
        quantize_nvfp4(k, weight_scale_2=nvfp4_global_scale(weight_amax(q)))
    with pytest.raises(ValueError, match="finite and > 0"):
        quantize_nvfp4(q, weight_scale_2=torch.tensor(0.0))


# Measured on [256, 1024] bf16 weights, 6 seeds: Gaussian 20.43-20.46 dB, Student-t(3) 20.8-21.1 dB
# (block scaling makes NVFP4 insensitive to tails). Floors sit ~1 dB below the seed-0 values. They
# catch gross errors (measured: swapped nibbles -3 dB, every code one step low 9.8 dB, global scale
# off by 2x ~0 dB); the exact rounding rules are pinned by the bit-exact and rounding-table tests.
SQNR_FLOOR_DB = {"gaussian": 19.4, "student_t3": 19.8}


@pytest.mark.parametrize("kind", sorted(SQNR_FLOOR_DB))
def test_round_trip_sqnr_against_float64(kind: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(256, 1024, generator=gen, dtype=torch.float64)
    if kind == "student_t3":  # normal / sqrt(chi2_3 / 3)
        w = w / torch.sqrt(torch.randn(3, 256, 1024, generator=gen, dtype=torch.float64).pow(2).sum(0) / 3)
    w_bf16 = w.to(torch.bfloat16)
    deq = dequantize_nvfp4(*quantize_nvfp4(w_bf16), dtype=torch.float32)
    assert sqnr_db(w_bf16, deq) > SQNR_FLOOR_DB[kind]


def test_every_element_lands_on_its_blocks_nearest_grid_point() -> None:
    """float64 reference: per block, no other value of {±e2m1 · s · s2} is closer to w."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    packed, block_scale, scale_2 = quantize_nvfp4(w)
    deq = dequantize_nvfp4(packed, block_scale, scale_2, torch.float64).reshape(64, 8, BLOCK)
    step = (block_scale.double() * scale_2.double()).unsqueeze(-1).unsqueeze(-1)  # [64, 8, 1, 1]
    grid = torch.tensor(E2M1_GRID, dtype=torch.float64)
    candidates = torch.cat([grid, -grid]) * step  # [64, 8, 1, 16]
    wb = w.double().reshape(64, 8, BLOCK, 1)
    best = (wb - candidates).abs().min(-1).values
    # slack: deq uses the fp32-rounded product s * s2, the candidates the exact float64 one
    assert torch.all((wb.squeeze(-1) - deq).abs() <= best + step.squeeze(-1) * 2**-20)


def test_row_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.randn(50, 256, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    whole = quantize_nvfp4(w)
    monkeypatch.setattr(common, "CPU_CHUNK_ELEMS", 3 * 256)  # 3 rows a chunk, 17 chunks
    chunked = quantize_nvfp4(w)
    assert all(torch.equal(bits(a), bits(b)) for a, b in zip(whole, chunked))
    assert torch.equal(dequantize_nvfp4(*chunked), dequantize_nvfp4(*whole))


def test_non_contiguous_input() -> None:
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(6))
    wt = w.t()  # [48, 64] view, not contiguous
    assert all(
        torch.equal(bits(a), bits(b)) for a, b in zip(quantize_nvfp4(wt), quantize_nvfp4(wt.contiguous()))
    )


def test_stacked_experts_use_one_global_scale_each() -> None:
    spread = torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1)  # different amax per expert
    w = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(7)) * spread
    packed, block_scale, scale_2 = quantize_nvfp4_experts(w.to(torch.bfloat16))
    assert packed.shape == (3, 16, 16) and block_scale.shape == (3, 16, 2) and scale_2.shape == (3,)
    for e in range(3):
        one = quantize_nvfp4(w[e].to(torch.bfloat16))
        assert torch.equal(packed[e], one[0]) and torch.equal(bits(block_scale[e]), bits(one[1]))
        assert torch.equal(scale_2[e], one[2])
    with pytest.raises(ValueError, match="3 experts"):
        quantize_nvfp4_experts(w, weight_scale_2=torch.ones(2))


def test_compressed_tensors_global_scales_are_reciprocals() -> None:
    scale_2 = torch.tensor(0.0015229724813252687, dtype=torch.float32)
    ct = ct_global_scale(scale_2)
    assert ct.shape == (1,) and ct.dtype == torch.float32
    assert torch.equal(ct, (1 / scale_2).reshape(1))  # what compressed-tensors' converter stores
    back = modelopt_global_scale(ct)
    fp32_ulp = 2.0 ** (math.frexp(float(scale_2))[1] - 24)
    assert back.shape == () and abs(float(back) - float(scale_2)) <= fp32_ulp
    # dequantizing with the CT convention (scale / global) agrees with ModelOpt's to an fp32 ulp
    fx = load_file(FIXTURES / "modelopt_nvfp4_fixture.safetensors")
    ct_deq = dequantize_nvfp4(fx["weight"], fx["weight_scale"], 1 / ct, torch.float32)
    torch.testing.assert_close(ct_deq, fx["dequantized"], rtol=2**-22, atol=0)


def test_input_scale() -> None:
    assert float(nvfp4_input_scale(torch.tensor(2688.0))) == 1.0
    # a never-active module: ModelOpt's export_amax puts maxbound (6) in place of a zero amax
    for numerics in NUMERICS_MODES:
        zero = nvfp4_input_scale(torch.tensor(0.0), numerics)
        assert torch.equal(bits(zero), bits(nvfp4_input_scale(torch.tensor(6.0), numerics)))
        assert float(zero) == pytest.approx(6 / 2688, rel=2**-23)
    with pytest.raises(ValueError, match="finite and >= 0"):
        nvfp4_input_scale(torch.tensor(-1.0))
    with pytest.raises(ValueError, match="finite and >= 0"):
        nvfp4_input_scale(torch.tensor(math.nan))


def test_dequantize_rejects_mismatched_scales() -> None:
    packed, block_scale, scale_2 = quantize_nvfp4(torch.randn(4, 64))
    with pytest.raises(ValueError, match="block scale shape"):
        dequantize_nvfp4(packed, block_scale[:, :2], scale_2)
