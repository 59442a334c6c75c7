"""The compressed-tensors config and tensors, spelled exactly as llm-compressor 0.14 writes them
(reference/lab_llmc_vllm.md Part 1, verbatim), and the validator on hand-broken CT exports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from ct_helpers import ct_exported_fixture  # noqa: F401  (the session fixture `ct_exported`)
from safetensors import safe_open
from safetensors.torch import save_file

from quantgate.exporter.source import open_source
from quantgate.validators.layout import Kind
from quantgate.validators.report import validate
from quantgate.validators.schemes import COMPRESSED_TENSORS, ct_group_schemes, scheme

# llm-compressor 0.14.0.1 / compressed-tensors 0.19.0 on a 2-layer Qwen3-MoE (lab_llmc_vllm.md, verbatim).
LAB_QWEN3_CONFIGS = {
    "w4a16": '{"config_groups":{"group_0":{"format":"pack-quantized","input_activations":null,"output_activations":null,"targets":["Linear"],"weights":{"actorder":null,"block_structure":null,"dynamic":false,"group_size":128,"num_bits":4,"observer":"memoryless_minmax","observer_kwargs":{},"scale_dtype":null,"strategy":"group","symmetric":true,"type":"int","zp_dtype":null}}},"format":"pack-quantized","global_compression_ratio":null,"ignore":["model.layers.0.mlp.gate","model.layers.1.mlp.gate","lm_head"],"kv_cache_scheme":null,"quant_method":"compressed-tensors","quantization_status":"compressed","sparsity_config":{},"transform_config":{},"version":"0.19.0"}',
    "nvfp4": '{"config_groups":{"group_0":{"format":"nvfp4-pack-quantized","input_activations":{"actorder":null,"block_structure":null,"dynamic":"local","group_size":16,"num_bits":4,"observer":"static_minmax","observer_kwargs":{},"scale_dtype":"torch.float8_e4m3fn","strategy":"tensor_group","symmetric":true,"type":"float","zp_dtype":null},"output_activations":null,"targets":["Linear"],"weights":{"actorder":null,"block_structure":null,"dynamic":false,"group_size":16,"num_bits":4,"observer":"memoryless_minmax","observer_kwargs":{},"scale_dtype":"torch.float8_e4m3fn","strategy":"tensor_group","symmetric":true,"type":"float","zp_dtype":null}}},"format":"nvfp4-pack-quantized","global_compression_ratio":null,"ignore":["model.layers.0.mlp.gate","model.layers.1.mlp.gate","lm_head"],"kv_cache_scheme":null,"quant_method":"compressed-tensors","quantization_status":"compressed","sparsity_config":{},"transform_config":{},"version":"0.19.0"}',
    "fp8": '{"config_groups":{"group_0":{"format":"float-quantized","input_activations":{"actorder":null,"block_structure":null,"dynamic":false,"group_size":null,"num_bits":8,"observer":"static_minmax","observer_kwargs":{},"scale_dtype":null,"strategy":"tensor","symmetric":true,"type":"float","zp_dtype":null},"output_activations":null,"targets":["Linear"],"weights":{"actorder":null,"block_structure":null,"dynamic":false,"group_size":null,"num_bits":8,"observer":"memoryless_minmax","observer_kwargs":{},"scale_dtype":null,"strategy":"tensor","symmetric":true,"type":"float","zp_dtype":null}}},"format":"float-quantized","global_compression_ratio":null,"ignore":["model.layers.0.mlp.gate","model.layers.1.mlp.gate","lm_head"],"kv_cache_scheme":null,"quant_method":"compressed-tensors","quantization_status":"compressed","sparsity_config":{},"transform_config":{},"version":"0.19.0"}',
    "w8a8_int8": '{"config_groups":{"group_0":{"format":"int-quantized","input_activations":{"actorder":null,"block_structure":null,"dynamic":true,"group_size":null,"num_bits":8,"observer":null,"observer_kwargs":{},"scale_dtype":null,"strategy":"token","symmetric":true,"type":"int","zp_dtype":null},"output_activations":null,"targets":["Linear"],"weights":{"actorder":null,"block_structure":null,"dynamic":false,"group_size":null,"num_bits":8,"observer":"memoryless_minmax","observer_kwargs":{},"scale_dtype":null,"strategy":"channel","symmetric":true,"type":"int","zp_dtype":null}}},"format":"int-quantized","global_compression_ratio":null,"ignore":["model.layers.0.mlp.gate","model.layers.1.mlp.gate","lm_head"],"kv_cache_scheme":null,"quant_method":"compressed-tensors","quantization_status":"compressed","sparsity_config":{},"transform_config":{},"version":"0.19.0"}',
}
# The lab's tensor table: a [128, 128] q_proj of layer 0 (the experts carry the same set).
LAB_Q_PROJ_TENSORS = {
    "w4a16": {"weight_packed": ("I32", [128, 16]), "weight_scale": ("BF16", [128, 1]), "weight_shape": ("I64", [2])},
    "nvfp4": {"weight_packed": ("U8", [128, 64]), "weight_scale": ("F8_E4M3", [128, 8]),
              "weight_global_scale": ("F32", [1]), "input_global_scale": ("F32", [1])},
    "fp8": {"weight": ("F8_E4M3", [128, 128]), "weight_scale": ("BF16", [1]), "input_scale": ("BF16", [1])},
    "w8a8_int8": {"weight": ("I8", [128, 128]), "weight_scale": ("BF16", [128, 1])},
}


def _quantization_config(result) -> dict:
    return json.loads((result.output / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("recipe", sorted(LAB_QWEN3_CONFIGS))
def test_config_spelled_as_llm_compressor(ct_exported, recipe: str) -> None:
    """Every key, value and list order equals llm-compressor's; only `version` names our CT release."""
    from quantgate.exporter.writers.compressed_tensors import CT_VERSION

    _, result = ct_exported("qwen3_moe", recipe)
    ours = _quantization_config(result)
    lab = json.loads(LAB_QWEN3_CONFIGS[recipe])
    assert ours["version"] == CT_VERSION
    assert {**ours, "version": lab["version"]} == lab
    assert list(ours) == sorted(ours)             # compressed-tensors writes sort_keys=True


def test_nvfp4a16_is_the_nvfp4_group_without_activations(ct_exported) -> None:
    _, result = ct_exported("qwen3_moe", "nvfp4a16")
    group = _quantization_config(result)["config_groups"]["group_0"]
    lab = json.loads(LAB_QWEN3_CONFIGS["nvfp4"])["config_groups"]["group_0"]
    assert group == {**lab, "input_activations": None}


def test_mixtral_ignore_names_its_routers(ct_exported) -> None:
    _, result = ct_exported("mixtral", "w4a16")
    assert _quantization_config(result)["ignore"] == [
        "model.layers.0.block_sparse_moe.gate", "model.layers.1.block_sparse_moe.gate", "lm_head"]


@pytest.mark.parametrize("recipe", sorted(LAB_Q_PROJ_TENSORS))
def test_tensor_layout_matches_llm_compressor(ct_exported, recipe: str) -> None:
    _, result = ct_exported("qwen3_moe", recipe)
    tensors = open_source(str(result.output)).view.tensors
    for prefix in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.0.gate_proj"):
        got = {n[len(prefix) + 1:]: (t.dtype, list(t.shape)) for n, t in tensors.items() if n.startswith(prefix + ".")}
        assert got == LAB_Q_PROJ_TENSORS[recipe], prefix
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == "BF16"       # the router stays BF16


@pytest.mark.parametrize(("recipe", "expected"), [("w4a16", "W4A16"), ("w8a8_int8", "W8A8"), ("nvfp4", "NVFP4"),
                                                  ("nvfp4a16", "NVFP4A16"), ("fp8", "FP8")])
def test_validator_reads_each_group_as_its_scheme(ct_exported, recipe: str, expected: str) -> None:
    _, result = ct_exported("llama", recipe)
    qc = _quantization_config(result)
    assert ct_group_schemes(qc["config_groups"]["group_0"], qc["format"]) == [scheme(COMPRESSED_TENSORS, expected)]


# ---- the validator on broken exports -------------------------------------------------------------
def _experts_back_to_bf16(export: Path, source: Path, out: Path) -> Path:
    """The lab's broken case: the config still says W4A16, but every expert tensor is the BF16 original."""
    shutil.copytree(export, out)
    src, exp = open_source(str(source)), open_source(str(export))
    experts = [m for m in exp.layout.modules.values() if m.kind is Kind.EXPERT]
    drop = {t.name for m in experts for t in m.tensors.values()}
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys() if name not in drop}  # noqa: SIM118
    for m in experts:
        state[f"{m.name}.weight"] = src.module_weight(src.layout.modules[m.name])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_validator_catches_experts_swapped_back_to_bf16(ct_exported, tmp_path: Path) -> None:
    """vLLM raises `AttributeError: ... has no parameter 'w2_weight'` on this (lab_llmc_vllm.md): the
    config puts the experts in the W4A16 group while their bytes are BF16."""
    source, result = ct_exported("qwen3_moe", "w4a16")
    broken = _experts_back_to_bf16(result.output, source, tmp_path / "broken")
    report = validate(str(broken))
    errors = [f for f in report.findings if f.severity.value == "error"]
    assert errors and not report.ok
    flagged = {m for f in errors for m in f.modules}
    assert any(".mlp.experts." in m for m in flagged), errors
    assert report.verdicts["vllm"]["status"] == "fails"
    assert "has no parameter 'w2_weight'" in report.verdicts["vllm"]["reason"]     # the lab's vLLM error


def test_validator_passes_experts_bf16_when_ignored_by_regex(ct_exported, tmp_path: Path) -> None:
    """The legal way to ship BF16 experts under a quantized config: `re:.*mlp.experts.*` in `ignore`
    (vLLM then builds the unquantized MoE method and loads the same files)."""
    source, result = ct_exported("qwen3_moe", "w4a16")
    fixed = _experts_back_to_bf16(result.output, source, tmp_path / "fixed")
    config = json.loads((fixed / "config.json").read_text())
    config["quantization_config"]["ignore"].append("re:.*mlp.experts.*")
    (fixed / "config.json").write_text(json.dumps(config, indent=2))
    report = validate(str(fixed))
    assert report.ok, [(f.code, f.message) for f in report.findings if f.severity.value == "error"]
    assert report.verdicts["vllm"]["status"] == "loads"
