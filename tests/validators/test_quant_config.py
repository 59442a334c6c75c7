"""Quantization-config parsing: both ModelOpt forms, compressed-tensors, precedence, malformed input."""

from __future__ import annotations

import pytest

from quantgate.validators.quant_config import parse_quant_config

NESTED = {"producer": {"name": "modelopt", "version": "0.47.0"},
          "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                           "exclude_modules": ["lm_head", "model.layers.0.router*", "model.layers.1.router*"]}}
FLAT = {"config_groups": {"group_0": {"input_activations": {"dynamic": False, "num_bits": 4, "type": "float",
                                                            "group_size": 16},
                                      "weights": {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16},
                                      "targets": ["Linear"]}},
        "ignore": ["lm_head", "model.layers.0.router*", "model.layers.1.router*"], "quant_algo": "NVFP4",
        "producer": {"name": "modelopt", "version": "0.47.0"}, "quant_method": "modelopt"}
CT = {"config_groups": {"group_0": {"format": "pack-quantized", "input_activations": None, "output_activations": None,
                                    "targets": ["Linear"], "weights": {"group_size": 128, "num_bits": 4,
                                                                       "strategy": "group", "type": "int"}}},
      "format": "pack-quantized", "ignore": ["model.layers.0.mlp.gate", "lm_head"], "kv_cache_scheme": None,
      "quant_method": "compressed-tensors", "quantization_status": "compressed", "version": "0.19.0"}


def codes(findings) -> list[str]:
    return sorted(f.code for f in findings)


def test_modelopt_nested_only() -> None:
    qc, findings = parse_quant_config({"architectures": ["X"]}, NESTED)
    assert findings == []
    assert (qc.dialect, qc.quant_algo, qc.source, qc.form, qc.group_size) == (
        "modelopt", "NVFP4", "hf_quant_config.json", "nested", 16)
    assert qc.exclude == ["lm_head", "model.layers.0.router*", "model.layers.1.router*"]


def test_config_json_wins_and_agreeing_files_are_silent() -> None:
    qc, findings = parse_quant_config({"quantization_config": FLAT}, NESTED)
    assert findings == []
    assert (qc.source, qc.form, qc.group_size) == ("config.json", "flat", 16)


def test_disagreeing_files_are_a_finding() -> None:
    stale = {**NESTED, "quantization": {**NESTED["quantization"], "quant_algo": "FP8", "exclude_modules": ["lm_head"]}}
    qc, findings = parse_quant_config({"quantization_config": FLAT}, stale)
    assert codes(findings) == ["QG102"]
    assert qc.quant_algo == "NVFP4"               # config.json wins, as in vLLM
    assert "quant_algo 'NVFP4' vs 'FP8'" in findings[0].message


def test_compressed_tensors() -> None:
    qc, findings = parse_quant_config({"quantization_config": CT}, None)
    assert findings == []
    assert (qc.dialect, qc.ct_format, qc.quantization_status, qc.quant_algo) == (
        "compressed-tensors", "pack-quantized", "compressed", None)
    assert qc.exclude == ["model.layers.0.mlp.gate", "lm_head"] and "group_0" in qc.config_groups


def test_multimodal_text_config_and_compression_alias() -> None:
    qc, _ = parse_quant_config({"text_config": {"quantization_config": FLAT}}, None)
    assert qc.quant_algo == "NVFP4"
    qc, _ = parse_quant_config({"compression_config": CT}, None)
    assert qc.dialect == "compressed-tensors"


def test_flat_kv_cache_scheme_means_fp8() -> None:
    qc, _ = parse_quant_config({"quantization_config": {**FLAT, "kv_cache_scheme": {
        "dynamic": False, "num_bits": 8, "type": "float"}}}, None)
    assert qc.kv_cache_quant_algo == "FP8"


def test_no_config_is_none() -> None:
    assert parse_quant_config({"architectures": ["LlamaForCausalLM"]}, None) == (None, [])
    assert parse_quant_config(None, None) == (None, [])


def test_other_quant_method_is_kept_as_its_own_dialect() -> None:
    qc, findings = parse_quant_config({"quantization_config": {"quant_method": "bitsandbytes",
                                                               "load_in_4bit": True}}, None)
    assert qc.dialect == "bitsandbytes" and findings == []


def test_gptq_lacking_vllm_required_keys_is_malformed() -> None:
    """vLLM GPTQConfig.from_config reads bits, group_size, desc_act with get_from_keys (raises)."""
    qc, findings = parse_quant_config({"quantization_config": {"quant_method": "gptq", "bits": 4}}, None)
    assert qc.dialect == "gptq" and qc.params.missing == ("group_size", "desc_act")
    assert [f.code for f in findings] == ["QG103"] and "group_size" in findings[0].predicted_error


@pytest.mark.parametrize("config,hf,expected", [
    ({"quantization_config": {**FLAT, "ignore": "lm_head"}}, None, ["QG103"]),
    ({"quantization_config": {**FLAT, "quant_algo": 7}}, None, ["QG103", "QG103"]),
    ({"quantization_config": {**FLAT, "group_size": "sixteen"}}, None, ["QG103"]),
    ({"quantization_config": {**FLAT, "ignore": ["lm_head", 3, None]}}, None, ["QG103"]),
    ({"quantization_config": "NVFP4"}, None, ["QG103"]),
    ({"quantization_config": {"no_method": True}}, None, ["QG103"]),
    ({"quantization_config": {**CT, "config_groups": []}}, None, ["QG103"]),
    ({"quantization_config": {**CT, "config_groups": {"g": {"targets": "Linear"}}}}, None, ["QG103"]),
    ({"quantization_config": {**CT, "config_groups": {"g": {"targets": ["Linear"], "weights": 4}}}}, None,
     ["QG103"]),
    (None, {"quantization": {"quant_algo": "NVFP4", "exclude_modules": []}}, ["QG105"]),
    (None, {"producer": {"name": "modelopt"}, "quantization": []}, ["QG103", "QG103"]),
    (None, [1, 2], ["QG103"]),
])
def test_malformed_values_become_findings(config, hf, expected) -> None:
    qc, findings = parse_quant_config(config, hf)
    assert codes(findings) == expected


def test_ignored_file_problems_do_not_matter() -> None:
    """hf_quant_config.json is never read when config.json has a quantization config."""
    _, findings = parse_quant_config({"quantization_config": FLAT}, {"quantization": "garbage"})
    assert codes(findings) == ["QG102"]
