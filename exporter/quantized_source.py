"""Refuse an already-quantized source before anything is loaded.

Quantizing a quantized checkpoint cannot work: transformers either refuses to load it (mismatched
packed shapes, a missing compressed-tensors package) or dequantizes it, and the planner would read
packed `U8` / `I8` weights as if they were BF16. What makes a source quantized, decided from the
config and the safetensors headers only (no tensor data, no model):

* a quantization config where vLLM looks for one (`config.json` `quantization_config` /
  `compression_config`, a wrapper's `text_config`, else `hf_quant_config.json`), parsed by the
  validator's own parser (`quantgate.validators.quant_config.parse_quant_config`);
* else tensors a BF16 checkpoint never has: a quantization suffix of the validator's layout table
  (`weight_scale`, `input_scale`, `weight_packed`, `k_scale`, ...) or a weight stored in a
  quantized dtype (FP8, FP4, int8 / uint8 packing).
"""

from __future__ import annotations

from collections.abc import Mapping

from quantgate.validators.errors import UsageError
from quantgate.validators.layout import SCALE_SUFFIXES
from quantgate.validators.quant_config import QuantConfig, config_json_quant_section, parse_quant_config
from quantgate.validators.safetensors_header import TensorInfo
from quantgate.validators.schemes import ct_group_schemes

#: Tensor name suffixes only quantized checkpoints carry (the layout table's scale suffixes plus the
#: packed compressed-tensors weight).
QUANTIZED_SUFFIXES: frozenset[str] = frozenset(SCALE_SUFFIXES) | {"weight_packed"}
#: Storage dtypes of quantized weights; a BF16 checkpoint keeps its weights in BF16 / F16 / F32.
QUANTIZED_WEIGHT_DTYPES: frozenset[str] = frozenset(
    {"F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8"}
)
FIX = "quantize the original BF16 checkpoint"


class AlreadyQuantizedError(UsageError):
    """The source is a quantized checkpoint (CLI exit 2, service `bad_input`)."""


def describe_config(qc: QuantConfig) -> str:
    """"ModelOpt NVFP4", "compressed-tensors W8A8", "quant_method fp8" ... for a parsed config."""
    if qc.is_modelopt:
        return f"ModelOpt {qc.quant_algo or 'unknown algo'}"
    if qc.is_ct:
        names = sorted({
            spec.name
            for group in (qc.config_groups or {}).values() if isinstance(group, Mapping)
            for spec in ct_group_schemes(group, qc.ct_format)
        })
        what = "/".join(names) if 0 < len(names) <= 2 else (qc.ct_format or "")
        return f"compressed-tensors {what}".strip()
    return f"quant_method {qc.dialect}"


def quantized_tensors(tensors: Mapping[str, TensorInfo]) -> list[TensorInfo]:
    """Tensors a BF16 checkpoint never has (see the module docstring)."""
    found = []
    for name, info in tensors.items():
        suffix = name.rsplit(".", 1)[-1]
        if suffix in QUANTIZED_SUFFIXES or (suffix == "weight" and info.dtype in QUANTIZED_WEIGHT_DTYPES):
            found.append(info)
    return found


def quantized_reason(config: dict | None, hf_quant_config: dict | None,
                     tensors: Mapping[str, TensorInfo]) -> str | None:
    """What marks the checkpoint as quantized ("ModelOpt NVFP4", ...), or None for a plain checkpoint."""
    qc, _findings = parse_quant_config(config, hf_quant_config)
    if qc is not None:
        return describe_config(qc)
    if config_json_quant_section(config) is not None or hf_quant_config is not None:
        return "a quantization config quantgate cannot read"
    found = quantized_tensors(tensors)
    if found:
        first = found[0]
        return f"{len(found)} quantized tensor(s) and no quantization config, e.g. {first.name} {first.dtype}"
    return None


def refuse_quantized_source(config: dict | None, hf_quant_config: dict | None,
                            tensors: Mapping[str, TensorInfo]) -> None:
    """AlreadyQuantizedError when the checkpoint is already quantized."""
    reason = quantized_reason(config, hf_quant_config, tensors)
    if reason is not None:
        raise AlreadyQuantizedError(f"source is already quantized ({reason}): {FIX}")
