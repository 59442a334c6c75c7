"""Which quantization formats quantgate models, as data with sources.

Two tables: every `quant_method` vLLM registers (`vllm/model_executor/layers/quantization/__init__.py`
`QuantizationMethods`, read 2026; SGLang's extras noted) and every compressed-tensors `format` vLLM
loads (`compressed_tensors.py` / CT `CompressionFormat`, reference llmcompressor_and_services.md §A1).
Each entry is either modelled (a dialect with a tensor set in `quantgate.validators.schemes.SCHEMES` and rules)
or explicitly not modelled: a checkpoint in a not-modelled format must get the `unknown` verdict,
never a confident one (issue 10 part 2): `is_modelled(qc)` / `not_modelled(qc)` are the one answer
the rule runner (rules/__init__.py), the analysis and QG190 (rules/dialects.py) read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quantgate.validators.quant_config import QuantConfig

VLLM_INIT = "vllm quantization/__init__.py QuantizationMethods"
CT_FORMAT_SRC = "compressed-tensors config/base.py CompressionFormat; vllm compressed_tensors.py"


@dataclass(frozen=True)
class FormatSupport:
    name: str
    modelled: bool
    dialect: str | None      # our dialect (validators.schemes) when modelled
    source: str              # where the engine accepts it
    note: str = ""


def _m(name: str, dialect: str, note: str = "", source: str = VLLM_INIT) -> FormatSupport:
    return FormatSupport(name, True, dialect, source, note)


def _n(name: str, note: str, source: str = VLLM_INIT) -> FormatSupport:
    return FormatSupport(name, False, None, source, note)


#: quant_method (lower case, as in config.json) -> support
QUANT_METHODS: dict[str, FormatSupport] = {f.name: f for f in (
    _m("modelopt", "modelopt"), _m("modelopt_fp4", "modelopt"), _m("modelopt_mxfp8", "modelopt"),
    _m("modelopt_mixed", "modelopt"),
    _m("compressed-tensors", "compressed-tensors", "formats per CT_FORMATS"),
    _m("fp8", "fp8", "HF-native FineGrainedFP8; dialect of the `fp8` branch (issue 10)"),
    _m("mxfp4", "mxfp4", "GPT-OSS; vllm mxfp4.py, formats_beyond_two.md §3"),
    _m("gpt_oss_mxfp4", "mxfp4", "newest vLLM's name for mxfp4 on model_type gpt_oss"),
    _m("gptq", "gptq", "vllm gptq_marlin.py / gptq.py, formats_beyond_two.md §4"),
    _m("gptq_marlin", "gptq", "engine kernel name; checkpoints say gptq"),
    _m("auto_gptq", "gptq", "newest vLLM's rename of gptq_marlin (auto_gptq.py)"),
    _m("awq", "awq", "vllm awq_marlin.py / awq.py, formats_beyond_two.md §5"),
    _m("awq_marlin", "awq", "engine kernel name; checkpoints say awq"),
    _m("auto_awq", "awq", "newest vLLM's rename of awq_marlin (auto_awq.py)"),
    _n("moe_wna16", "engine-side kernel for GPTQ/AWQ MoE (modelled only as the gptq/awq fallback)"),
    _n("quark", "AMD Quark: exclude exact/re:/fnmatch by version (formats_beyond_two.md §6)"),
    _n("fbgemm_fp8", "per-channel FP8 Linear only, MoE unquantized (formats_beyond_two.md §6)"),
    _n("bitsandbytes", "own model loader; llm_int8_skip_modules (formats_beyond_two.md §6)"),
    _n("gguf", "not a safetensors format"),
    _n("torchao", "torchao tensor subclasses"),
    _n("inc", "Intel Neural Compressor / auto-round"),
    _n("auto-round", "Intel auto-round (vLLM maps it to inc)"),
    _n("fp_quant", "FP-Quant (Hadamard-rotated MXFP4/NVFP4)"),
    _n("humming", "humming kernels"),
    _n("experts_int8", "online int8 experts (no checkpoint format)"),
    _n("deepseek_v4_fp8", "DeepSeek-V4 FP8 variant"),
    _n("cpu_awq", "CPU AWQ kernels"),
    _n("online", "online quantization (no checkpoint format)"),
    _n("petit_nvfp4", "ROCm reader of ModelOpt NVFP4 (formats_beyond_two.md §6, not analysed)"),
    _n("modelslim", "Ascend / SGLang modelslim (not analysed)", source="sglang model_config.py"),
    _n("w4afp8", "SGLang mixed W4A8 (older MIXED_PRECISION path)", source="sglang model_config.py"),
)}

#: compressed-tensors `format` -> support (modelled formats have specs with that `ct_format`)
CT_FORMATS: dict[str, FormatSupport] = {f.name: f for f in (
    _m("nvfp4-pack-quantized", "compressed-tensors", source=CT_FORMAT_SRC),
    _m("float-quantized", "compressed-tensors", source=CT_FORMAT_SRC),
    _m("pack-quantized", "compressed-tensors", source=CT_FORMAT_SRC),
    _m("int-quantized", "compressed-tensors", source=CT_FORMAT_SRC),
    _m("mxfp4-pack-quantized", "compressed-tensors", "weight_packed U8 [out,in/2] + E8M0 weight_scale [out,in/32]",
       source=CT_FORMAT_SRC),
    _m("mxfp8-quantized", "compressed-tensors", "e4m3 weight + E8M0 weight_scale [out,in/32]", source=CT_FORMAT_SRC),
    _m("mixed-precision", "compressed-tensors", "per-group formats, each modelled or not", source=CT_FORMAT_SRC),
    _n("naive-quantized", "unpacked int weights with float dtype", source=CT_FORMAT_SRC),
    _n("dense", "no quantization compressor (sparsity only)", source=CT_FORMAT_SRC),
    _n("sparse-bitmask", "sparsity compressor", source=CT_FORMAT_SRC),
    _n("sparse-24-bitmask", "2:4 sparsity (vllm compressed_tensors_24.py)", source=CT_FORMAT_SRC),
    _n("marlin-24", "2:4 sparse W4A16 (vllm compressed_tensors_w4a16_24.py)", source=CT_FORMAT_SRC),
)}


def method_support(quant_method: str) -> FormatSupport | None:
    """The entry for a quant_method (case-insensitive, `compressed_tensors` spelled either way)."""
    return QUANT_METHODS.get(quant_method.strip().lower().replace("compressed_tensors", "compressed-tensors"))


def is_modelled_method(quant_method: str) -> bool:
    """Modelled in this build: its dialect has specs in the scheme table."""
    from quantgate.validators.schemes import DIALECTS_WITH_SCHEMES

    entry = method_support(quant_method)
    return entry is not None and entry.modelled and entry.dialect in DIALECTS_WITH_SCHEMES


def not_modelled(qc: "QuantConfig | None") -> FormatSupport | None:
    """The part of `qc` quantgate does not model (verdict `unknown`, QG190; --strict makes it fail):
    its quant_method, a GPTQ/AWQ bit width or a compressed-tensors format (global or per config
    group) - or None when every part of it is modelled."""
    if qc is None:
        return None
    entry = method_support(qc.dialect)
    if entry is None:
        return FormatSupport(qc.dialect, False, None, "not registered by vLLM", "unknown quant_method")
    if not is_modelled_method(qc.dialect):
        return entry
    bits = getattr(qc.params, "bits", None)
    if isinstance(bits, int) and bits in _engine_bits(qc.dialect):
        # GPTQ/AWQ: a width the engine accepts is modelled only with a tensor set (a width the engine
        # rejects is a confident `fails`, QG141)
        from quantgate.validators.schemes import SCHEMES

        if not any(s.dialect == qc.dialect and s.weight_bits == bits for s in SCHEMES):
            return FormatSupport(f"{qc.dialect} {bits}-bit", False, None, entry.source,
                                 f"no {bits}-bit {qc.dialect} tensor set in validators/schemes_beyond.py")
    if qc.is_ct:
        formats = {qc.ct_format} | {g.get("format") for g in (qc.config_groups or {}).values()}
        for fmt in sorted(f for f in formats if isinstance(f, str)):
            ct = CT_FORMATS.get(fmt)
            if ct is not None and not ct.modelled:
                return ct
    return None


def _engine_bits(dialect: str) -> frozenset[int]:
    from quantgate.validators.dialects_wna16 import AWQ_BITS, GPTQ_BITS

    return {"gptq": GPTQ_BITS, "awq": AWQ_BITS}.get(dialect, frozenset())


def is_modelled(qc: "QuantConfig | None") -> bool:
    """Does quantgate model how the engines load this config's checkpoints (no config: yes, BF16)?"""
    return not_modelled(qc) is None


def modelled_dialects() -> list[str]:
    """The dialects modelled in this build, in table order (for messages)."""
    return list(dict.fromkeys(e.dialect for name, e in QUANT_METHODS.items() if is_modelled_method(name)))
