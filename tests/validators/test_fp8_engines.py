"""The native fp8 exclusion matchers per engine and version (formats_beyond_two.md §2), and the
config parse (the engines' startup errors)."""

from __future__ import annotations

import pytest

from quantgate.validators.engine_facts import parse_version
from quantgate.validators.engines import ARCH_NAMING, DEFAULT_NAMING, FusedShardConflict
from quantgate.validators.errors import UsageError
from quantgate.validators.format_support import is_modelled
from quantgate.validators.fp8_engines import DOT_BOUNDARY, EXACT, SUBSTRING, fp8_exclusion, fp8_matching, fp8_patterns
from quantgate.validators.quant_config import parse_quant_config
from quantgate.validators.schemes import fp8_native_for, match_scheme, scheme

L0 = "model.layers.0"
DSV3 = ARCH_NAMING["DeepseekV3ForCausalLM"]

# (engine, version, prefix (engine layer), exclusion list, excluded by pattern | None | "conflict")
MATCH_CASES: list[tuple[str, str | None, str, list[str], str | None]] = [
    # vLLM is_layer_skipped: exact; fused shards by exact membership; experts substring rule; no wildcards
    ("vllm", None, f"{L0}.self_attn.o_proj", [f"{L0}.self_attn.o_proj"], f"{L0}.self_attn.o_proj"),
    ("vllm", None, f"{L0}.self_attn.o_proj", [f"{L0}.self_attn"], None),
    ("vllm", None, f"{L0}.self_attn.o_proj", ["model.layers.*.self_attn.o_proj"], None),
    ("vllm", None, f"{L0}.self_attn.qkv_proj", [f"{L0}.self_attn.{p}_proj" for p in "qkv"], f"{L0}.self_attn.q_proj"),
    ("vllm", None, f"{L0}.self_attn.qkv_proj", [f"{L0}.self_attn.q_proj"], "conflict"),
    ("vllm", None, f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate"], None),
    ("vllm", None, f"{L0}.mlp.experts", [f"{L0}.mlp.experts.3.down_proj"], f"{L0}.mlp.experts.3.down_proj"),
    ("vllm", None, f"{L0}.mlp.experts", [f"{L0}.mlp"], None),
    ("vllm", None, f"{L0}.mlp.shared_experts.down_proj", [f"{L0}.mlp.shared_experts.down_proj"],
     f"{L0}.mlp.shared_experts.down_proj"),
    # SGLang up to v0.5.10: plain substring (sglang #23687)
    ("sglang", "0.5.10", f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate"], f"{L0}.mlp.gate"),
    ("sglang", "0.5.10", f"{L0}.self_attn.o_proj", ["self_attn"], "self_attn"),
    ("sglang", "0.5.10", f"{L0}.mlp.experts", [f"{L0}.mlp.experts.3.down_proj"], f"{L0}.mlp.experts.3.down_proj"),
    ("sglang", "0.5.10", f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"], f"{L0}.mlp.gate_proj"),
    ("sglang", "0.5.10", f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate_proj"], None),   # no shard check: no error
    ("sglang", "0.5.10", f"{L0}.linear_attn.in_proj_ba", [f"{L0}.linear_attn.in_proj_a"], None),
    ("sglang", "0.4.0", f"{L0}.mlp.experts", [f"{L0}.mlp"], f"{L0}.mlp"),
    # SGLang v0.5.11+ (PR #23467): dot-boundary, fused shards, experts rule
    ("sglang", "0.5.11", f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate"], None),
    ("sglang", None, f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate_proj", f"{L0}.mlp.up_proj"], f"{L0}.mlp.gate_proj"),
    ("sglang", None, f"{L0}.mlp.gate_up_proj", [f"{L0}.mlp.gate_proj"], "conflict"),
    ("sglang", None, f"{L0}.self_attn.o_proj", ["self_attn"], "self_attn"),
    ("sglang", None, f"{L0}.self_attn.o_proj", [L0], L0),
    ("sglang", None, f"{L0}.self_attn.o_proj", ["attn"], None),
    ("sglang", "0.6", f"{L0}.mlp.experts", [f"{L0}.mlp.experts.3.down_proj"], f"{L0}.mlp.experts.3.down_proj"),
    ("sglang", None, f"{L0}.linear_attn.in_proj_ba", [f"{L0}.linear_attn.in_proj_b"], "conflict"),
]


@pytest.mark.parametrize("engine,version,prefix,listed,expected", MATCH_CASES,
                         ids=[f"{c[0]}-{c[1] or 'newest'}-{i}" for i, c in enumerate(MATCH_CASES)])
def test_fp8_exclusion(engine: str, version: str | None, prefix: str, listed: list[str], expected: str | None) -> None:
    naming = DEFAULT_NAMING
    if expected == "conflict":
        with pytest.raises(FusedShardConflict, match="Detected some but not all shards"):
            fp8_exclusion(engine, prefix, tuple(listed), naming, version)
        return
    hit = fp8_exclusion(engine, prefix, tuple(listed), naming, version)
    assert (hit.pattern if hit else None) == expected


def test_deepseek_fused_qkv_a_shards() -> None:
    listed = (f"{L0}.self_attn.q_a_proj",)
    with pytest.raises(FusedShardConflict):
        fp8_exclusion("vllm", f"{L0}.self_attn.fused_qkv_a_proj", listed, DSV3)
    assert fp8_exclusion("vllm", f"{L0}.self_attn.fused_qkv_a_proj",
                         listed + (f"{L0}.self_attn.kv_a_proj_with_mqa",), DSV3) is not None


def test_version_table() -> None:
    assert parse_version("v0.5.11rc1") == (0, 5, 11) and parse_version("0.5") == (0, 5, 0)
    with pytest.raises(UsageError, match="not a release number"):
        parse_version("latest")
    assert fp8_matching("vllm").value == EXACT
    assert fp8_matching("sglang").value == DOT_BOUNDARY
    assert fp8_matching("sglang", "0.5.10").value == SUBSTRING
    assert fp8_matching("sglang", (0, 5, 10)).value == SUBSTRING
    assert fp8_matching("sglang", "0.5.11").value == DOT_BOUNDARY
    assert all(row.source for row in (fp8_matching("vllm"), fp8_matching("sglang", "0.1")))
    with pytest.raises(KeyError):
        fp8_matching("trt-llm")


def test_patterns_follow_the_models_mapper() -> None:
    naming = ARCH_NAMING["Qwen3_5MoeForConditionalGeneration"]
    listed = ["model.language_model.layers.0.mlp.gate", "lm_head"]
    assert fp8_patterns("vllm", listed, naming) == ("language_model.model.layers.0.mlp.gate", "language_model.lm_head")


def test_config_parse_and_schemes() -> None:
    qc, findings = parse_quant_config({"quantization_config": {
        "quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.layers.0.mlp.gate"]}}, None)
    assert not findings and qc.dialect == "fp8" and is_modelled(qc)
    s = qc.params
    assert s.exclusions == ("lm_head", "model.layers.0.mlp.gate") and s.exclusion_key == "modules_to_not_convert"
    assert s.declared() == [scheme("fp8", "FP8_BLOCK")] and s.label == "fp8 block 128x128"
    # ignored_layers wins over modules_to_not_convert (vLLM Fp8Config.from_config)
    qc, _ = parse_quant_config({"quantization_config": {
        "quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["a"], "modules_to_not_convert": ["b"]}},
        None)
    assert qc.exclude == ["a"] and qc.params.declared() == [scheme("fp8", "FP8_TENSOR_STATIC")]
    odd = fp8_native_for((64, 128))
    assert odd.name == "FP8_BLOCK_64x128" and odd.by_suffix["weight_scale_inv"].shape(300, 200) == (5, 2)


@pytest.mark.parametrize("config,error", [
    ({}, "Cannot find any of ['activation_scheme']"),
    ({"activation_scheme": "per_token"}, "Unsupported activation scheme per_token"),
    ({"activation_scheme": "static", "weight_block_size": [128, 128]}, "only supports dynamic activation scheme"),
    ({"activation_scheme": "dynamic", "weight_block_size": [128, 128, 1]}, "must have 2 dimensions, but got 3"),
    ({"activation_scheme": "dynamic", "ignored_layers": "lm_head"}, "ignored_layers must be a list"),
])
def test_config_errors(config: dict, error: str) -> None:
    _, findings = parse_quant_config({"quantization_config": {"quant_method": "fp8", **config}}, None)
    assert [f.code for f in findings] == ["QG103"] and error in findings[0].predicted_error


def test_bytes_match_the_native_schemes() -> None:
    from quantgate.validators.safetensors_header import TensorInfo

    def info(dtype: str, *shape: int) -> TensorInfo:
        return TensorInfo("t", dtype, shape, "f", 0, 0)

    block = {"weight": info("F8_E4M3", 300, 200), "weight_scale_inv": info("F32", 3, 2)}
    assert match_scheme("fp8", block) is scheme("fp8", "FP8_BLOCK")
    assert match_scheme("fp8", {**block, "weight_scale_inv": info("F32", 2, 3)}) is None
    static = {"weight": info("F8_E4M3", 8, 8), "weight_scale": info("F32"), "input_scale": info("F32", 1)}
    assert match_scheme("fp8", static) is scheme("fp8", "FP8_TENSOR_STATIC")
    assert match_scheme("fp8", {k: v for k, v in static.items() if k != "input_scale"}) is scheme("fp8", "FP8_TENSOR")


def test_tp_alignment_reads_the_native_fp8_block() -> None:
    """QG711/QG712 judge per-rank partitions with the config's own weight_block_size (out, in)."""
    from quantgate.validators.deployment import _alignment

    assert _alignment(fp8_native_for((128, 128))) == (128, 128)
    assert _alignment(fp8_native_for((64, 128))) == (64, 128)
