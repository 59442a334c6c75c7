"""The modelled / not-modelled table: every format vLLM accepts has an entry, and modelled ones a tensor set."""

from __future__ import annotations

import pytest

from quantgate.validators.format_support import (
    CT_FORMATS,
    QUANT_METHODS,
    is_modelled,
    is_modelled_method,
    method_support,
    not_modelled,
)
from quantgate.validators.quant_config import parse_quant_config
from quantgate.validators.schemes import COMPRESSED_TENSORS, DIALECTS_WITH_SCHEMES, SCHEMES

#: vLLM `QuantizationMethods` (quantization/__init__.py, 2026 registry version) plus the renamed aliases
VLLM_METHODS = (
    "awq", "fp8", "fbgemm_fp8", "fp_quant", "modelopt", "modelopt_fp4", "modelopt_mxfp8", "modelopt_mixed", "gguf",
    "gptq_marlin", "awq_marlin", "gptq", "humming", "compressed-tensors", "bitsandbytes", "experts_int8", "quark",
    "moe_wna16", "torchao", "inc", "mxfp4", "gpt_oss_mxfp4", "deepseek_v4_fp8", "cpu_awq", "online",
    "auto_gptq", "auto_awq")
#: compressed-tensors formats vLLM dispatches (CompressionFormat)
CT = ("dense", "sparse-bitmask", "sparse-24-bitmask", "int-quantized", "float-quantized", "naive-quantized",
      "pack-quantized", "marlin-24", "mixed-precision", "nvfp4-pack-quantized", "mxfp4-pack-quantized",
      "mxfp8-quantized")


@pytest.mark.parametrize("method", VLLM_METHODS)
def test_every_vllm_method_is_modelled_or_explicitly_not(method: str) -> None:
    entry = method_support(method)
    assert entry is not None and entry.source and (entry.modelled or entry.note)


@pytest.mark.parametrize("fmt", CT)
def test_every_ct_format_has_a_tensor_set_or_is_explicitly_not_modelled(fmt: str) -> None:
    entry = CT_FORMATS[fmt]
    specs = [s for s in SCHEMES if s.dialect == COMPRESSED_TENSORS and s.ct_format == fmt]
    assert entry.modelled == bool(specs) or fmt == "mixed-precision"


def test_modelled_dialects_have_specs_in_this_build() -> None:
    for name in ("gptq", "gptq_marlin", "awq", "awq_marlin", "mxfp4", "modelopt", "compressed-tensors"):
        assert is_modelled_method(name), name
    assert {"gptq", "awq", "mxfp4"} <= DIALECTS_WITH_SCHEMES
    assert all(e.dialect for e in QUANT_METHODS.values() if e.modelled)


@pytest.mark.parametrize("section,gap", [
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "made_up"}, "made_up"),
    ({"quant_method": "compressed-tensors", "format": "marlin-24",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4}}}}, "marlin-24"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True}, None),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128, "desc_act": False, "sym": True}, "gptq 3-bit"),
    # a width the engine rejects is QG141's confident `fails`, not a gap in the model
    ({"quant_method": "gptq", "bits": 5, "group_size": 128, "desc_act": False, "sym": True}, None),
    ({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}, None),
    ({"quant_method": "mxfp4"}, None),
])
def test_not_modelled_hook(section: dict, gap: str | None) -> None:
    qc, _ = parse_quant_config({"quantization_config": section}, None)
    found = not_modelled(qc)
    assert (found.name if found else None) == gap



@pytest.mark.parametrize("method,dialect,params", [
    ("gptq_marlin", "gptq", "WNA16Params"), ("auto_gptq", "gptq", "WNA16Params"), ("awq_marlin", "awq", "WNA16Params"),
    ("gpt_oss_mxfp4", "mxfp4", "Mxfp4Params"), ("fp8", "fp8", "Fp8Settings"),
])
def test_one_registry_parses_every_modelled_spelling(method: str, dialect: str, params: str) -> None:
    """quant_method -> dialect comes from QUANT_METHODS, dialect -> parser from dialects.DIALECT_MODULES;
    every dialect's own settings land in QuantConfig.params."""
    section = {"quant_method": method, "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
               "zero_point": True, "version": "gemm", "activation_scheme": "dynamic"}
    qc, _ = parse_quant_config({"quantization_config": section}, None)
    assert qc.dialect == dialect and type(qc.params).__name__ == params and is_modelled(qc)


def test_unmodelled_keeps_a_bare_config() -> None:
    qc, findings = parse_quant_config({"quantization_config": {"quant_method": "quark", "exclude": ["lm_head"]}}, None)
    assert qc.dialect == "quark" and qc.params is None and not is_modelled(qc) and not findings
