"""The scheme table: tensor sets per (dialect, scheme), shape functions, identification from headers."""

from __future__ import annotations

import pytest

from quantgate.validators.safetensors_header import TensorInfo
from quantgate.validators.schemes import (
    AMAX_OVER,
    COMPRESSED_TENSORS,
    MODELOPT,
    RECIPROCAL,
    SCHEMES,
    SchemeSpec,
    bits_per_weight,
    expected_shapes,
    match_scheme,
    mixed_precision_schemes,
    scheme,
    scheme_for_quant_algo,
)

OUT, IN = 256, 512  # a linear [256, 512]: divisible by every block size in the table

# (dialect, scheme name, out, in) -> the tensors the references say a quantized linear carries:
# ModelOpt per modelopt.md §2 / vllm_sglang.md §3, compressed-tensors per llmcompressor_and_services.md §A2.
CASES: list[tuple[str, str, int, int, dict[str, tuple[str, tuple[int, ...]]]]] = [
    (
        MODELOPT,
        "NVFP4",
        OUT,
        IN,
        {
            "weight": ("U8", (256, 256)),
            "weight_scale": ("F8_E4M3", (256, 32)),
            "weight_scale_2": ("F32", ()),
            "input_scale": ("F32", ()),
        },
    ),
    (
        MODELOPT,
        "NVFP4_WEIGHT_ONLY",
        OUT,
        IN,
        {"weight": ("U8", (256, 256)), "weight_scale": ("F8_E4M3", (256, 32)), "weight_scale_2": ("F32", ())},
    ),
    (
        MODELOPT,
        "FP8",
        OUT,
        IN,
        {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("F32", ()), "input_scale": ("F32", ())},
    ),
    (
        MODELOPT,
        "FP8_PER_CHANNEL",
        OUT,
        IN,
        {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("F32", (256,))},
    ),
    (MODELOPT, "FP8_PB_WO", OUT, IN, {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("F32", (2, 4))}),
    (MODELOPT, "MXFP8", OUT, IN, {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("U8", (256, 16))}),
    (
        COMPRESSED_TENSORS,
        "NVFP4",
        OUT,
        IN,
        {
            "weight_packed": ("U8", (256, 256)),
            "weight_scale": ("F8_E4M3", (256, 32)),
            "weight_global_scale": ("F32", (1,)),
            "input_global_scale": ("F32", (1,)),
        },
    ),
    (
        COMPRESSED_TENSORS,
        "NVFP4A16",
        OUT,
        IN,
        {
            "weight_packed": ("U8", (256, 256)),
            "weight_scale": ("F8_E4M3", (256, 32)),
            "weight_global_scale": ("F32", (1,)),
        },
    ),
    (
        COMPRESSED_TENSORS,
        "FP8",
        OUT,
        IN,
        {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("BF16", (1,)), "input_scale": ("BF16", (1,))},
    ),
    (
        COMPRESSED_TENSORS,
        "FP8_DYNAMIC",
        OUT,
        IN,
        {"weight": ("F8_E4M3", (256, 512)), "weight_scale": ("BF16", (256, 1))},
    ),
    (
        COMPRESSED_TENSORS,
        "FP8_BLOCK",
        200,
        300,
        {"weight": ("F8_E4M3", (200, 300)), "weight_scale": ("BF16", (2, 3))},
    ),
    (
        COMPRESSED_TENSORS,
        "W4A16",
        OUT,
        IN,
        {
            "weight_packed": ("I32", (256, 64)),
            "weight_scale": ("BF16", (256, 4)),
            "weight_shape": ("I64", (2,)),
            "weight_zero_point": ("I32", (32, 4)),
            "weight_g_idx": ("I32", (512,)),
        },
    ),
    (COMPRESSED_TENSORS, "W8A8", OUT, IN, {"weight": ("I8", (256, 512)), "weight_scale": ("BF16", (256, 1))}),
]
IDS = [f"{d}:{n}" for d, n, *_ in CASES]


def infos(
    tensors: dict[str, tuple[str, tuple[int, ...]]], module: str = "model.layers.0.mlp.down_proj"
) -> dict:
    """suffix -> TensorInfo, as a module's tensors look in a parsed header."""
    return {
        s: TensorInfo(f"{module}.{s}", dtype, shape, "model.safetensors", 0, 0)
        for s, (dtype, shape) in tensors.items()
    }


@pytest.mark.parametrize(("dialect", "name", "out", "in_", "tensors"), CASES, ids=IDS)
def test_expected_tensors_per_scheme(dialect: str, name: str, out: int, in_: int, tensors: dict) -> None:
    spec = scheme(dialect, name)
    shapes = expected_shapes(spec, out, in_)
    optional = {t.suffix for t in spec.tensors if not t.required}
    assert {s: v[1] for s, v in tensors.items()} == shapes
    assert spec.required_suffixes == set(tensors) - optional
    for suffix, (dtype, _) in tensors.items():
        assert spec.write_dtype(suffix) == dtype
    assert spec.in_features_from_weight(tensors[spec.weight_suffix][1]) == in_


@pytest.mark.parametrize(("dialect", "name", "out", "in_", "tensors"), CASES, ids=IDS)
def test_match_scheme_identifies_the_bytes(
    dialect: str, name: str, out: int, in_: int, tensors: dict
) -> None:
    spec = scheme(dialect, name)
    assert match_scheme(dialect, infos(tensors)) is spec
    required_only = {s: v for s, v in tensors.items() if s in spec.required_suffixes}
    assert match_scheme(dialect, infos(required_only)) is spec
    # tensors no scheme writes (bias, KV scales) do not change the answer
    extra = {**tensors, "bias": ("BF16", (out,)), "k_scale": ("F32", ())}
    assert match_scheme(dialect, infos(extra)) is spec


@pytest.mark.parametrize("spec", SCHEMES, ids=lambda s: s.key)
def test_every_spec_round_trips_through_its_own_shapes(spec: SchemeSpec) -> None:
    for out, in_ in ((128, 256), (384, 1024)):
        written = {t.suffix: (t.dtypes[0], t.shape(out, in_)) for t in spec.tensors}
        assert match_scheme(spec.dialect, infos(written)) is spec
        assert (
            match_scheme(None, infos(written)).in_features_from_weight(written[spec.weight_suffix][1]) == in_
        )


@pytest.mark.parametrize(("dialect", "name", "out", "in_", "tensors"), CASES, ids=IDS)
def test_wrong_dtype_or_shape_is_not_matched(
    dialect: str, name: str, out: int, in_: int, tensors: dict
) -> None:
    spec = scheme(dialect, name)
    for suffix in spec.required_suffixes:
        dtype, shape = tensors[suffix]
        foreign = next(d for d in ("F64", "I16") if d not in spec.by_suffix[suffix].dtypes)
        bad_dtype = {**tensors, suffix: (foreign, shape)}
        bad_shape = {**tensors, suffix: (dtype, (*shape, 3))}
        missing = {s: v for s, v in tensors.items() if s != suffix}
        for broken in (bad_dtype, bad_shape):
            assert match_scheme(dialect, infos(broken)) is None, (suffix, broken[suffix])
        found = match_scheme(dialect, infos(missing))
        assert found is not spec, f"{spec.key} matched without {suffix}"


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"weight": ("BF16", (64, 64))}, None),  # unquantized
        ({"weight": ("U8", (64, 32)), "weight_scale": ("F8_E4M3", (64, 3))}, None),  # scale block count off
        (
            {
                "weight": ("U8", (64, 32)),
                "weight_scale": ("F8_E4M3", (64, 4)),
                "weight_scale_2": ("F32", ()),
                "input_scale": ("F32", ()),
                "weight_global_scale": ("F32", (1,)),
            },
            None,
        ),  # dialects mixed
        ({"weight": ("F8_E4M3", (64, 64)), "weight_scale": ("F32", (64, 1))}, "modelopt:FP8_PER_CHANNEL"),
        ({"weight": ("F8_E4M3", (256, 256)), "weight_scale": ("F32", (2, 1, 2, 1))}, "modelopt:FP8_PB_WO"),
        (
            {"weight": ("F8_E4M3", (64, 64)), "weight_scale": ("F32", (1,)), "input_scale": ("F32", (1,))},
            "modelopt:FP8",
        ),
    ],
)
def test_modelopt_edge_cases(tensors: dict, expected: str | None) -> None:
    found = match_scheme(MODELOPT, infos(tensors))
    assert (found.key if found else None) == expected


def test_dialect_none_searches_both_and_dialects_do_not_cross() -> None:
    ct = infos(CASES[IDS.index("compressed-tensors:NVFP4")][4])
    assert match_scheme(None, ct) is scheme(COMPRESSED_TENSORS, "NVFP4")
    assert match_scheme(MODELOPT, ct) is None


def test_lookup_by_name_alias_and_quant_algo() -> None:
    assert scheme(MODELOPT, "w4a16_nvfp4") is scheme(MODELOPT, "NVFP4_WEIGHT_ONLY")
    assert scheme(COMPRESSED_TENSORS, "nvfp4-pack-quantized") is scheme(COMPRESSED_TENSORS, "NVFP4")
    assert scheme(COMPRESSED_TENSORS, "W8A8_INT8").ct_format == "int-quantized"
    assert scheme_for_quant_algo("fp8_pb_wo") is scheme(
        MODELOPT, "FP8_PB_WO"
    )  # ModelOpt writes it lower-case
    assert scheme_for_quant_algo("FP8_PER_CHANNEL_PER_TOKEN") is scheme(MODELOPT, "FP8_PER_CHANNEL")
    assert scheme_for_quant_algo("NVFP4_AWQ") is None
    with pytest.raises(KeyError, match="known: NVFP4, NVFP4_WEIGHT_ONLY"):
        scheme(MODELOPT, "INT3")


def test_mixed_precision_resolves_each_layer() -> None:
    layers = {
        "model.layers.0.self_attn.q_proj": {"quant_algo": "FP8"},
        "model.layers.0.mlp.experts.0.up_proj": {"quant_algo": "NVFP4", "group_size": 16},
        "model.layers.1.mlp.down_proj": {"quant_algo": "W4A16_NVFP4"},
        "model.layers.1.mlp.up_proj": {"quant_algo": "FP8_PB_WO"},  # not allowed in quantized_layers
        "model.layers.1.mlp.gate_proj": "NVFP4",
    }  # malformed entry
    assert {k: (v.key if v else None) for k, v in mixed_precision_schemes(layers).items()} == {
        "model.layers.0.self_attn.q_proj": "modelopt:FP8",
        "model.layers.0.mlp.experts.0.up_proj": "modelopt:NVFP4",
        "model.layers.1.mlp.down_proj": "modelopt:NVFP4_WEIGHT_ONLY",
        "model.layers.1.mlp.up_proj": None,
        "model.layers.1.mlp.gate_proj": None,
    }


def test_scheme_properties_for_writers_and_rules() -> None:
    nvfp4, ct_nvfp4 = scheme(MODELOPT, "NVFP4"), scheme(COMPRESSED_TENSORS, "NVFP4")
    assert nvfp4.key == "modelopt:NVFP4" and nvfp4.quant_algo == "NVFP4"
    assert (nvfp4.global_scale_convention, ct_nvfp4.global_scale_convention) == (AMAX_OVER, RECIPROCAL)
    assert nvfp4.in_divisor == 16 and nvfp4.activation_scales
    assert not scheme(MODELOPT, "NVFP4_WEIGHT_ONLY").activation_scales
    assert scheme(MODELOPT, "FP8_PB_WO").in_divisor == scheme(MODELOPT, "FP8_PB_WO").out_divisor == 128
    assert scheme(COMPRESSED_TENSORS, "W4A16").in_divisor == 128
    assert len({s.key for s in SCHEMES}) == len(SCHEMES)


@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        (("modelopt", "NVFP4"), 4.5),
        (("compressed-tensors", "NVFP4A16"), 4.5),
        (("modelopt", "FP8"), 8.0),
        (("compressed-tensors", "W4A16"), 4.125),
        (("compressed-tensors", "W8A8"), 8.0),
        (None, 16.0),
    ],
)
def test_bits_per_weight(spec: tuple[str, str] | None, bits: float) -> None:
    assert bits_per_weight(scheme(*spec) if spec else None) == pytest.approx(bits)


def test_bits_per_weight_unquantized_dtype() -> None:
    assert bits_per_weight(None, "F32") == 32
