"""ModelOpt dialect writer pieces: config spelling, exclude synthesis, shard planning and writing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quantgate.exporter.excludes import candidates, synthesize_excludes
from quantgate.exporter.writers.modelopt import hf_quant_config, quantization_config
from quantgate.exporter.writers.shard_plan import OutTensor, Unit, index_for, plan_shards
from quantgate.exporter.writers.sharding import ShardWriter
from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.schemes import scheme

# lab_modelopt.md §3, verbatim (ModelOpt 0.47, Gemma4, NVFP4_DEFAULT); only the producer differs.
MODELOPT_HF_QUANT_CONFIG = """{
    "producer": {
        "name": "modelopt",
        "version": "0.47.0"
    },
    "quantization": {
        "quant_algo": "NVFP4",
        "kv_cache_quant_algo": null,
        "group_size": 16,
        "exclude_modules": [
            "lm_head",
            "model.layers.0.router*",
            "model.layers.1.router*"
        ]
    }
}"""
MODELOPT_QUANTIZATION_CONFIG = """{"config_groups": {"group_0": {"input_activations": {"dynamic": false,
 "num_bits": 4, "type": "float", "group_size": 16}, "weights": {"dynamic": false, "num_bits": 4, "type": "float",
 "group_size": 16}, "targets": ["Linear"]}}, "ignore": ["lm_head", "model.layers.0.router*",
 "model.layers.1.router*"], "quant_algo": "NVFP4", "producer": {"name": "modelopt", "version": "0.47.0"},
 "quant_method": "modelopt"}"""
EXCLUDE = ["lm_head", "model.layers.0.router*", "model.layers.1.router*"]


def _as_modelopt(obj: dict) -> dict:
    return json.loads(json.dumps(obj).replace('"name": "quantgate"', '"name": "modelopt"')
                      .replace(f'"version": "{obj["producer"]["version"]}"', '"version": "0.47.0"'))


def test_nvfp4_configs_match_modelopt_verbatim() -> None:
    spec = scheme("modelopt", "NVFP4")
    ours = hf_quant_config(spec, EXCLUDE)
    assert ours["producer"]["name"] == "quantgate"
    assert json.dumps(_as_modelopt(ours), indent=4) == MODELOPT_HF_QUANT_CONFIG
    qc = quantization_config(spec, EXCLUDE)
    assert json.dumps(_as_modelopt(qc)) == json.dumps(json.loads(MODELOPT_QUANTIZATION_CONFIG))


def test_fp8_configs_differ_from_nvfp4_only_where_modelopt_does() -> None:
    """§3: FP8 is identical except quant_algo FP8, no group_size, config_groups num_bits 8."""
    fp8, nvfp4 = scheme("modelopt", "FP8"), scheme("modelopt", "NVFP4")
    hf, ref = hf_quant_config(fp8, EXCLUDE), hf_quant_config(nvfp4, EXCLUDE)
    del ref["quantization"]["group_size"]
    ref["quantization"]["quant_algo"] = "FP8"
    assert hf == ref
    qc = quantization_config(fp8, EXCLUDE)
    group = {"dynamic": False, "num_bits": 8, "type": "float"}
    assert qc["config_groups"] == {"group_0": {"input_activations": group, "weights": group, "targets": ["Linear"]}}
    assert qc["quant_algo"] == "FP8" and qc["ignore"] == EXCLUDE


def test_candidates_start_like_modelopt() -> None:
    c = candidates("model.layers.0.router.proj")
    assert c[:5] == ["model*", "model.layers*", "model.layers.0*", "model.layers.0.router*",
                     "model.layers.0.router.proj"]
    assert "*layers.0.router*" in c
    fused = candidates("model.layers.0.self_attn.q_proj", exact_early=False)
    assert fused[-1] == "model.layers.0.self_attn.q_proj"


def _layers(n: int, names: list[str]) -> list[str]:
    return [f"model.layers.{i}.{x}" for i in range(n) for x in names]


def _assert_exact(patterns, excluded, quantized, arch=None) -> None:
    for sem in ENGINE_SEMANTICS.values():
        assert all(sem.is_excluded(m, patterns, arch) for m in excluded), (sem.name, patterns)
        assert not any(sem.is_excluded(q, patterns, arch) for q in quantized), (sem.name, patterns)


def test_router_patterns_fold_across_layers() -> None:
    quantized = _layers(3, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.experts.0.down_proj"])
    excluded = _layers(3, ["mlp.gate"]) + ["model.embed_tokens"]
    result = synthesize_excludes(excluded, quantized, "Qwen3MoeForCausalLM", always=["lm_head"])
    assert result.patterns == ["lm_head", "model.embed_tokens", "model.layers.*.mlp.gate"]
    assert not result.uncovered and not result.overreach
    _assert_exact(result.patterns, excluded, quantized)


def test_substring_trap_mlp_gate_vs_gate_up_proj() -> None:
    """`...mlp.gate` is a substring of vLLM's `...mlp.gate_up_proj`: never emit it when gate_proj is
    quantized in the same layer (invariant 11)."""
    quantized = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    excluded = ["model.layers.0.mlp.gate"]
    result = synthesize_excludes(excluded, quantized, None)
    assert "model.layers.0.mlp.gate" not in result.patterns
    assert not result.uncovered and not result.overreach
    _assert_exact(result.patterns, excluded, quantized)


def test_gemma4_bf16_experts_excluded_in_engine_name_space() -> None:
    """HF `layers.N.experts*` never matches vLLM's `layers.N.moe.experts`; the synthesized pattern must."""
    arch = "Gemma4ForCausalLM"
    excluded = [f"model.layers.1.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    quantized = [f"model.layers.0.experts.{e}.{p}" for e in range(4) for p in ("gate_proj", "up_proj", "down_proj")]
    quantized += _layers(2, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"])
    result = synthesize_excludes(excluded, quantized, arch)
    assert not result.uncovered and not result.overreach, result
    _assert_exact(result.patterns, excluded, quantized, arch)


def _unit(name: str, nbytes: int) -> Unit:
    return Unit(tensors=(OutTensor(name, "U8", (nbytes,)),), job=name)


def test_shard_plan_packs_in_order_and_names_like_transformers() -> None:
    units = [_unit(f"t{i}", n) for i, n in enumerate([40, 40, 30, 100, 10])]
    shards = plan_shards(units, 100)
    assert [[u.key for u in s.units] for s in shards] == [["t0", "t1"], ["t2"], ["t3"], ["t4"]]
    assert [s.file for s in shards] == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = index_for(shards)
    assert index["metadata"]["total_size"] == 220 and index["weight_map"]["t3"] == shards[2].file
    assert [s.file for s in plan_shards(units, 10_000)] == ["model.safetensors"]
    with pytest.raises(ValueError):
        plan_shards(units, 0)


def test_shard_writer_checks_plan_and_streams(tmp_path: Path) -> None:
    units = [_unit(f"t{i}", 64) for i in range(4)]
    shards = plan_shards(units, 128)
    seen: list[int] = []
    writer = ShardWriter(tmp_path, on_buffer=seen.append)
    for shard in shards:
        writer.write(shard, lambda u: {u.key: torch.full((64,), int(u.key[1:]), dtype=torch.uint8)})
    writer.close()   # shards are fsynced and renamed into place in the background until then
    assert writer.max_buffered_bytes == 64 and max(seen) == 64   # one unit in hand, never a shard
    assert load_file(str(tmp_path / shards[1].file))["t3"].tolist() == [3] * 64
    assert not list(tmp_path.glob(".*partial"))
    with pytest.raises(RuntimeError, match="planned U8"):
        writer.write(shards[0], lambda u: {u.key: torch.zeros(64, dtype=torch.float32)})
