"""The schemes the exporter writes, one entry each (the only place a scheme's behaviour is listed).

Sources: ModelOpt 0.47 (shared/reference/lab_modelopt.md §3, modelopt.md §1-§4), llm-compressor 0.14 /
compressed-tensors 0.19-0.20 presets (lab_llmc_vllm.md Part 1; the 0.20 dumps of the MXFP4 and
FP8_BLOCK presets are recorded in tests/exporter/fixtures/compressed_tensors/ct_config_groups.json),
transformers' FineGrainedFP8 (formats_beyond_two.md §2). Adding a scheme: its numerics module, an
entry here, and its tensors in `quantgate.validators.schemes` (when the validator does not know them).
"""

from __future__ import annotations

from quantgate.exporter.schemes.core import DECODER_LINEAR_KINDS, Form, Lazy, Numerics, RecipeDef, Scheme, ct_args
from quantgate.validators.layout import Kind
from quantgate.validators.schemes import COMPRESSED_TENSORS, FP8_NATIVE, MODELOPT, MXFP4

_N = "quantgate.exporter.numerics."
_FP8_SCALE_DTYPE = "torch.float8_e4m3fn"
_MX_SCALE_DTYPE = "torch.uint8"

NVFP4_NUMERICS = Numerics(
    Lazy(_N + "nvfp4:quantize_nvfp4"), Lazy(_N + "nvfp4:dequantize_nvfp4"),
    ("weight", "weight_scale", "weight_scale_2"), scale_arg=True, numerics_aware=True,
    group_scale=Lazy(_N + "nvfp4:shared_global_scale"), scale_from_amax=Lazy(_N + "nvfp4:nvfp4_global_scale"))
#: CT NVFP4: packed weight and the reciprocal global scales (2688 / amax); NVFP4A16 has no input scale.
_CT_NVFP4A16 = {"renames": {"weight": "weight_packed", "weight_scale_2": "weight_global_scale"},
                "conversions": {"weight_global_scale": "reciprocal"}}
_CT_NVFP4 = {"renames": {**_CT_NVFP4A16["renames"], "input_scale": "input_global_scale"},
             "conversions": {**_CT_NVFP4A16["conversions"], "input_global_scale": "reciprocal"}}
_CT_NVFP4_ARGS = ct_args(type="float", num_bits=4, group_size=16, strategy="tensor_group",
                         scale_dtype=_FP8_SCALE_DTYPE)


SCHEMES: tuple[Scheme, ...] = (
    Scheme(
        "NVFP4",
        Numerics(NVFP4_NUMERICS.quantize, NVFP4_NUMERICS.dequantize, NVFP4_NUMERICS.outputs, scale_arg=True,
                 numerics_aware=True, group_scale=NVFP4_NUMERICS.group_scale,
                 scale_from_amax=NVFP4_NUMERICS.scale_from_amax,
                 input_scale=Lazy(_N + "nvfp4:nvfp4_input_scale")),
        forms=(Form(MODELOPT, "NVFP4", config={"config_group": True}, experts_3d=True),
               Form(COMPRESSED_TENSORS, "NVFP4", **_CT_NVFP4,
                    config={"weights": _CT_NVFP4_ARGS,
                            "input_activations": ct_args(type="float", num_bits=4, group_size=16,
                                                         strategy="tensor_group", scale_dtype=_FP8_SCALE_DTYPE,
                                                         dynamic="local", observer="static_minmax")})),
        dialects=(MODELOPT, COMPRESSED_TENSORS), quant_algo="NVFP4",
        shared_scale_kinds=DECODER_LINEAR_KINDS, calibrates=True,
        recipes=(
            RecipeDef("nvfp4", DECODER_LINEAR_KINDS,
                      "NVFP4 W4A4 for every decoder Linear: attention, dense MLP, shared and routed experts"),
            RecipeDef("nvfp4_mlp_only", frozenset({Kind.MLP, Kind.SHARED_EXPERT, Kind.EXPERT}),
                      "NVFP4 W4A4 for dense MLP, shared and routed experts; attention stays BF16"),
            RecipeDef("nvfp4_experts_only", frozenset({Kind.EXPERT}), "NVFP4 W4A4 for routed experts only"),
        ),
        description="e2m1 weights, e4m3 scale per 16 inputs, fp32 global scale; static NVFP4 activations"),
    Scheme(
        "FP8",
        Numerics(Lazy(_N + "fp8:quantize_fp8"), Lazy(_N + "fp8:dequantize_fp8"), ("weight", "weight_scale"),
                 scale_arg=True, numerics_aware=True, group_scale=Lazy(_N + "fp8:fp8_group_scale"),
                 scale_from_amax=Lazy(_N + "fp8:fp8_scale"),
                 input_scale=Lazy(_N + "fp8:fp8_input_scale")),
        forms=(Form(MODELOPT, "FP8", config={"config_group": True}, experts_3d=True),
               Form(COMPRESSED_TENSORS, "FP8", scales_in_weight_dtype=True, also_reads=("FP8_DYNAMIC",),
                    conversions={"weight_scale": "weight_dtype", "input_scale": "weight_dtype"},
                    config={"weights": ct_args(type="float", num_bits=8),
                            "input_activations": ct_args(type="float", num_bits=8, observer="static_minmax")})),
        dialects=(MODELOPT, COMPRESSED_TENSORS), quant_algo="FP8",
        shared_scale_kinds=frozenset({Kind.EXPERT}),   # vLLM's FP8 MoE keeps one w13 scale per expert
        calibrates=True,
        recipes=(RecipeDef("fp8", DECODER_LINEAR_KINDS,
                           "FP8 per-tensor W8A8 (static input scales) for every decoder Linear"),),
        description="e4m3 weights, fp32 per-tensor scale; static per-tensor activations"),
    Scheme(
        "W4A16",
        Numerics(Lazy(_N + "int4:quantize_w4a16"), Lazy(_N + "int4:dequantize_w4a16"),
                 ("weight_packed", "weight_scale", "weight_shape"), kwargs={"group_size": 128}),
        forms=(Form(COMPRESSED_TENSORS, "W4A16",
                    config={"weights": ct_args(num_bits=4, group_size=128, strategy="group"),
                            "input_activations": None}),),
        dialects=(COMPRESSED_TENSORS,),
        recipes=(RecipeDef("w4a16", DECODER_LINEAR_KINDS,
                           "int4 weights (symmetric, group 128), BF16 activations, for every decoder Linear"),),
        description="symmetric int4 weights in groups of 128, BF16 activations"),
    Scheme(
        "W8A8",
        Numerics(Lazy(_N + "int8:quantize_w8a8_int8"), Lazy(_N + "int8:dequantize_w8a8_int8"),
                 ("weight", "weight_scale")),
        forms=(Form(COMPRESSED_TENSORS, "W8A8",
                    config={"weights": ct_args(num_bits=8, strategy="channel"),
                            "input_activations": ct_args(num_bits=8, dynamic=True, observer=None,
                                                         strategy="token")}),),
        dialects=(COMPRESSED_TENSORS,),
        recipes=(RecipeDef("w8a8_int8", DECODER_LINEAR_KINDS,
                           "int8 per-channel weights, dynamic per-token int8 activations, for every decoder Linear"),),
        description="int8 per-channel weights, dynamic per-token int8 activations"),
    Scheme(
        "NVFP4A16", NVFP4_NUMERICS,
        forms=(Form(COMPRESSED_TENSORS, "NVFP4A16", **_CT_NVFP4A16,
                    config={"weights": _CT_NVFP4_ARGS, "input_activations": None}),
               Form(MODELOPT, "NVFP4_WEIGHT_ONLY", writable=False, config={"config_group": True})),
        dialects=(COMPRESSED_TENSORS,), quant_algo="W4A16_NVFP4",
        shared_scale_kinds=DECODER_LINEAR_KINDS,
        recipes=(RecipeDef("nvfp4a16", DECODER_LINEAR_KINDS,
                           "NVFP4 weights, BF16 activations (no activation scales), for every decoder Linear"),),
        description="NVFP4 weights, BF16 activations"),
    Scheme(
        "FP8_BLOCK",
        Numerics(Lazy(_N + "fp8_block:quantize_fp8_block"), Lazy(_N + "fp8_block:dequantize_fp8_block"),
                 ("weight", "weight_scale_inv")),
        forms=(Form(FP8_NATIVE, "FP8_BLOCK"),
               # llm-compressor's FP8_BLOCK preset: its own numerics (scale in the weight dtype, ragged
               # edges padded), the 0.20 QuantizationArgs dumps recorded in the fixtures JSON
               Form(COMPRESSED_TENSORS, "FP8_BLOCK",
                    numerics=Numerics(Lazy(_N + "fp8_block_ct:quantize_fp8_block_ct"),
                                      Lazy(_N + "fp8_block_ct:dequantize_fp8_block_ct"), ("weight", "weight_scale")),
                    config={"weights": {"block_structure": [128, 128], "dynamic": False, "group_size": None,
                                        "num_bits": 8, "observer": "memoryless_minmax", "strategy": "block",
                                        "symmetric": True, "type": "float"},
                            "input_activations": {"dynamic": True, "group_size": 128, "num_bits": 8,
                                                  "strategy": "group", "symmetric": True, "type": "float"}})),
        dialects=(FP8_NATIVE, COMPRESSED_TENSORS),
        recipes=(RecipeDef("fp8_block", DECODER_LINEAR_KINDS,
                           "FP8 weights in 128x128 blocks (weight_scale_inv), dynamic activations, for every "
                           "decoder Linear (Hugging Face native fp8, as DeepSeek-V3 and Qwen3-FP8 ship; or llm-compressor's "
                           "FP8_BLOCK with --dialect compressed-tensors)"),),
        description="e4m3 weights with one scale per 128x128 block, dynamic activations"),
    Scheme(
        "MXFP4",
        Numerics(Lazy(_N + "mxfp4:quantize_mxfp4_native"), Lazy(_N + "mxfp4:dequantize_mxfp4_native"),
                 ("blocks", "scales")),
        # GPT-OSS native `*_blocks` / `*_scales`: written whole per 3-D tensor by writers/mxfp4_native.py
        forms=(Form(MXFP4, "MXFP4", experts_3d=True,
                    architectures={"GptOssForCausalLM": "vLLM / SGLang models/gpt_oss.py::_load_weights_mxfp4"}),
               # llm-compressor's MXFP4A16 preset (the MXFP4 preset's weights, no input quantization)
               Form(COMPRESSED_TENSORS, "MXFP4",
                    numerics=Numerics(Lazy(_N + "mxfp4:quantize_mxfp4_ct"), Lazy(_N + "mxfp4:dequantize_mxfp4"),
                                      ("weight_packed", "weight_scale")),
                    config={"weights": {"dynamic": False, "group_size": 32, "num_bits": 4,
                                        "observer": "memoryless_minmax", "scale_dtype": _MX_SCALE_DTYPE,
                                        "strategy": "group", "symmetric": True, "type": "float"},
                            "input_activations": None})),
        dialects=(COMPRESSED_TENSORS, MXFP4),
        recipes=(RecipeDef("mxfp4", DECODER_LINEAR_KINDS,
                           "MXFP4 weights (E2M1, E8M0 scale per 32), BF16 activations: every decoder Linear as "
                           "compressed-tensors mxfp4-pack-quantized, or GPT-OSS's routed experts in its native "
                           "mxfp4 form (--dialect mxfp4)"),),
        description="e2m1 weights, E8M0 (power of two) scale per 32 inputs"),
)
