"""Engine exclusion semantics, as a table of (engine, module, patterns, architecture, expected) cases
drawn from reference vllm_sglang.md §2 (vLLM), §5 (compressed-tensors) and §8 (SGLang)."""

from __future__ import annotations

import pytest

from quantgate.validators.engines import ENGINE_SEMANTICS, FusedShardConflict, ct_is_ignored, naming_for

G4 = "Gemma4ForCausalLM"
G4MM = "Gemma4ForConditionalGeneration"

CASES = [
    # exact name
    ("vllm", "model.layers.0.mlp.gate", ["model.layers.0.mlp.gate"], None, True),
    ("sglang", "model.layers.0.mlp.gate", ["model.layers.0.mlp.gate"], None, True),
    # vLLM substring rule: the router entry also hits the fused dense gate_up_proj (false positive)
    ("vllm", "model.layers.0.mlp.gate_proj", ["model.layers.0.mlp.gate"], None, True),
    ("sglang", "model.layers.0.mlp.gate_proj", ["model.layers.0.mlp.gate"], None, False),
    # fnmatch: `*` crosses dots
    ("vllm", "model.layers.3.self_attn.o_proj", ["*self_attn*"], None, True),
    ("sglang", "model.layers.3.self_attn.o_proj", ["*self_attn*"], None, True),
    ("vllm", "model.layers.3.mlp.down_proj", ["*self_attn*"], None, False),
    # `x*` split into `x` and `x.*` (ModelOpt's prefix wildcards)
    ("vllm", "model.layers.0.router.proj", ["model.layers.0.router*"], G4, True),
    ("sglang", "model.layers.0.router.proj", ["model.layers.0.router*"], G4, True),
    ("vllm", "model.layers.1.router.proj", ["model.layers.0.router*"], G4, False),
    # fused shards: q/k/v resolve through qkv_proj; all listed -> excluded
    ("vllm", "model.layers.0.self_attn.k_proj",
     ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
     None, True),
    # the expert rule: the MoE prefix is a substring of an entry naming one expert projection
    ("vllm", "model.layers.2.mlp.experts.5.up_proj", ["model.layers.2.mlp.experts.0.down_proj"], None, True),
    ("vllm", "model.layers.2.mlp.experts.5.up_proj", ["model.layers.3.mlp.experts.0.down_proj"], None, False),
    # Gemma4: experts live at `moe.experts` in the engines; HF-name entries never match
    ("vllm", "model.layers.0.experts.3.gate_proj", ["model.layers.0.experts*"], G4, False),
    ("sglang", "model.layers.0.experts.3.gate_proj", ["model.layers.0.experts*"], G4, False),
    ("vllm", "model.layers.0.experts.3.gate_proj", ["model.layers.0.moe.experts*"], G4, True),
    ("vllm", "model.layers.0.experts.3.gate_proj", ["*layers.0.*experts*"], G4, True),
    ("sglang", "model.layers.0.experts.3.gate_proj", ["*layers.0.*experts*"], G4, True),
    # without the Gemma4 rename (another architecture) the HF name is the engine name
    ("vllm", "model.layers.0.experts.3.gate_proj", ["model.layers.0.experts*"], None, True),
    # multimodal wrapper: patterns are mapped through hf_to_vllm_mapper like the names
    ("vllm", "model.language_model.layers.0.router.proj", ["model.language_model.layers.0.router*"], G4MM, True),
    ("vllm", "model.language_model.layers.0.experts.1.down_proj", ["model.language_model.layers.0.experts*"],
     G4MM, False),
    ("vllm", "lm_head", ["lm_head"], G4MM, True),
    # SGLang: a pattern full-matched against one dotted segment
    ("sglang", "model.layers.4.mlp.shared_expert_gate", ["shared_expert_gate"], None, True),
    ("vllm", "model.layers.4.mlp.shared_expert_gate", ["shared_expert_gate"], None, True),   # substring
    # SGLang MLA tails: substring of the last segment
    ("sglang", "model.layers.0.self_attn.kv_b_proj", ["layers.0.self_attn.kv_b_proj"], None, True),
]


@pytest.mark.parametrize("engine,module,patterns,arch,expected", CASES)
def test_is_excluded(engine: str, module: str, patterns: list[str], arch: str | None, expected: bool) -> None:
    assert ENGINE_SEMANTICS[engine].is_excluded(module, patterns, arch) is expected


@pytest.mark.parametrize("engine,module,arch,name", [
    ("vllm", "model.layers.0.experts.3.gate_proj", G4, "model.layers.0.moe.experts.3.gate_proj"),
    ("vllm", "model.layers.0.moe.experts.3.gate_proj", G4, "model.layers.0.moe.experts.3.gate_proj"),  # no double
    ("vllm", "model.layers.0.experts", G4, "model.layers.0.moe.experts"),
    ("vllm", "model.language_model.layers.2.experts.0.up_proj", G4MM,
     "language_model.model.layers.2.moe.experts.0.up_proj"),
    ("vllm", "model.vision_tower.encoder.layers.0.mlp.up_proj.linear", G4MM,
     "vision_tower.encoder.layers.0.mlp.up_proj.linear"),
    ("sglang", "model.layers.0.block_sparse_moe.experts.1.w1", "MixtralForCausalLM",
     "model.layers.0.block_sparse_moe.experts.1.w1"),
])
def test_engine_name(engine: str, module: str, arch: str, name: str) -> None:
    assert ENGINE_SEMANTICS[engine].engine_name(module, arch) == name


def test_fused_shard_conflict_raises_like_the_engine() -> None:
    sem = ENGINE_SEMANTICS["vllm"]
    naming = naming_for(None)
    with pytest.raises(FusedShardConflict, match="Detected some but not all shards of model.layers.0.self_attn.qkv_proj"):
        sem.match("model.layers.0.self_attn.qkv_proj", ("model.layers.0.self_attn.q_proj",), None)
    with pytest.raises(FusedShardConflict):
        ct_is_ignored("model.layers.0.mlp.gate_up_proj", ["model.layers.0.mlp.gate_proj"], naming)


@pytest.mark.parametrize("module,ignore,expected", [
    ("model.layers.0.mlp.gate", ["model.layers.0.mlp.gate"], True),
    ("model.layers.0.mlp.gate_proj", ["model.layers.0.mlp.gate"], False),           # exact, not substring
    ("model.layers.0.mlp.gate_proj", ["re:.*mlp.gate"], True),                       # re.match, not full
    ("model.layers.0.mlp.gate_proj", ["re:.*mlp.gate$"], False),
    ("lm_head", ["re:[bad"], False),                                                 # broken regex: no match
])
def test_compressed_tensors_ignore(module: str, ignore: list[str], expected: bool) -> None:
    assert ct_is_ignored(module, ignore, naming_for(None)) is expected
