"""Each producer's quantization config, spelled as it writes it (ModelOpt unified HF export,
llm-compressor / compressed-tensors, transformers FineGrainedFP8, GPTQModel, AutoAWQ, OpenAI mxfp4,
bitsandbytes, AMD Quark). Each returns `{"config": quantization_config, "files": {name: json}}`."""

from __future__ import annotations


def modelopt(algo: str, exclude: list[str], *, kv: str | None = None, version: str = "0.47.0") -> dict:
    """`{"config": quantization_config, "files": {"hf_quant_config.json": ...}}` (ModelOpt unified HF export)."""
    producer = {"name": "modelopt", "version": version}
    nested = {
        "producer": producer,
        "quantization": {
            "quant_algo": algo,
            "kv_cache_quant_algo": kv,
            **({"group_size": 16} if "NVFP4" in algo else {}),
            "exclude_modules": exclude,
        },
    }
    bits = 4 if "NVFP4" in algo else 8
    args = {"dynamic": False, "num_bits": bits, "type": "float", **({"group_size": 16} if bits == 4 else {})}
    flat = {
        "config_groups": {"group_0": {"input_activations": args, "weights": args, "targets": ["Linear"]}},
        "ignore": exclude,
        "quant_algo": algo,
        "producer": producer,
        "quant_method": "modelopt",
    }
    return {"config": flat, "files": {"hf_quant_config.json": nested}}


_CT_ARGS = {
    "actorder": None,
    "block_structure": None,
    "observer_kwargs": {},
    "symmetric": True,
    "zp_dtype": None,
}
CT_SCHEMES: dict[str, dict] = {
    "nvfp4-pack-quantized": {
        "weights": {
            **_CT_ARGS,
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "dynamic": False,
            "observer": "memoryless_minmax",
            "scale_dtype": "torch.float8_e4m3fn",
        },
        "input_activations": {
            **_CT_ARGS,
            "num_bits": 4,
            "type": "float",
            "strategy": "tensor_group",
            "group_size": 16,
            "dynamic": "local",
            "observer": "static_minmax",
            "scale_dtype": "torch.float8_e4m3fn",
        },
    },
    "pack-quantized": {
        "weights": {
            **_CT_ARGS,
            "num_bits": 4,
            "type": "int",
            "strategy": "group",
            "group_size": 128,
            "dynamic": False,
            "observer": "minmax",
            "scale_dtype": None,
        },
        "input_activations": None,
    },
    "float-quantized": {
        "weights": {
            **_CT_ARGS,
            "num_bits": 8,
            "type": "float",
            "strategy": "channel",
            "group_size": None,
            "dynamic": False,
            "observer": "minmax",
            "scale_dtype": None,
        },
        "input_activations": {
            **_CT_ARGS,
            "num_bits": 8,
            "type": "float",
            "strategy": "token",
            "group_size": None,
            "dynamic": True,
            "observer": None,
            "scale_dtype": None,
        },
    },
    "mxfp4-pack-quantized": {
        "weights": {
            **_CT_ARGS,
            "num_bits": 4,
            "type": "float",
            "strategy": "group",
            "group_size": 32,
            "dynamic": False,
            "observer": "minmax",
            "scale_dtype": "torch.uint8",
        },
        "input_activations": None,
    },
}


def compressed_tensors(
    fmt: str,
    ignore: list[str],
    *,
    groups: dict[str, tuple[str, list[str]]] | None = None,
    version: str = "0.13.0",
) -> dict:
    """llm-compressor's `quantization_config` (sort_keys). `groups`: name -> (format, targets) for mixed files."""
    groups = groups or {"group_0": (fmt, ["Linear"])}
    config_groups = {
        name: {"format": gfmt, "output_activations": None, "targets": targets, **CT_SCHEMES[gfmt]}
        for name, (gfmt, targets) in groups.items()
    }
    return {
        "config": {
            "config_groups": config_groups,
            "format": fmt,
            "global_compression_ratio": None,
            "ignore": ignore,
            "kv_cache_scheme": None,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": version,
        },
        "files": {},
    }


def hf_fp8(*, block: bool = True, ignore_key: str | None = None, ignore: list[str] | None = None) -> dict:
    """transformers' FineGrainedFP8 config as DeepSeek-V3 / Qwen3-*-FP8 ship it."""
    cfg: dict = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    if block:
        cfg["weight_block_size"] = [128, 128]
    if ignore_key:
        cfg[ignore_key] = ignore or []
    return {"config": cfg, "files": {}}


def gptq(*, bits: int = 4, dynamic: dict | None = None, producer: str = "gptqmodel:2.2.0") -> dict:
    cfg = {
        "bits": bits,
        "group_size": 128,
        "desc_act": False,
        "sym": True,
        "damp_percent": 0.01,
        "static_groups": False,
        "true_sequential": True,
        "checkpoint_format": "gptq",
        "quant_method": "gptq",
        "lm_head": False,
        "model_name_or_path": None,
        "model_file_base_name": None,
    }
    if dynamic is not None:
        cfg["dynamic"] = dynamic
        cfg["meta"] = {"quantizer": [producer]}
    return {"config": cfg, "files": {"quantize_config.json": cfg}}


def awq(*, not_convert: list[str] | None) -> dict:
    cfg = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": 128,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": not_convert,
    }
    return {"config": cfg, "files": {}}


def mxfp4() -> dict:
    """openai/gpt-oss-*: globs only transformers honours."""
    return {
        "config": {
            "quant_method": "mxfp4",
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
        },
        "files": {},
    }


def bitsandbytes_nf4() -> dict:
    return {
        "config": {
            "quant_method": "bitsandbytes",
            "_load_in_4bit": True,
            "_load_in_8bit": False,
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        },
        "files": {},
    }


def quark_fp8(exclude: list[str]) -> dict:
    """AMD Quark export (quant_method "quark"): `export`, `global_quant_config`, `exclude`."""
    fp8 = {"dtype": "fp8_e4m3", "qscheme": "per_tensor", "is_dynamic": False, "symmetric": True}
    return {
        "config": {
            "quant_method": "quark",
            "export": {"kv_cache_group": [], "pack_method": "reorder"},
            "global_quant_config": {
                "weight": fp8,
                "input_tensors": fp8,
                "output_tensors": None,
                "bias": None,
            },
            "layer_quant_config": {},
            "layer_type_quant_config": {},
            "exclude": exclude,
            "algo_config": None,
            "quant_mode": "eager_mode",
            "version": "0.9",
        },
        "files": {},
    }
