"""The corpus, continued: HF fp8, GPT-OSS mxfp4, GPTQ (incl. GPTQModel `dynamic`), AWQ, formats we do
not model (`unknown`), and name-space / integrity / per-architecture engine facts. Same record as
corpus_cases.py (which joins both lists into `CASES`)."""

from __future__ import annotations

import corpus_configs as qf
from corpus_build import Model
from corpus_spec import FAILS, LOADS, UNKNOWN, WRONG, Case, drop, routers, store_as

NV = "modelopt_nvfp4"
MOE_NVFP4 = {"attn": NV, "expert": NV}
W4 = {"hidden": 128, "inter": 128}  # group-128 formats need in_features % 128 == 0
#: vLLM checks merged fp8-block linears (q/k of qkv, gate of gate_up) % 128 even at TP=1
FP8_BLOCK_DIMS = {"hidden": 128, "inter": 128, "hd": 64}


def _attn_wildcards(m: Model) -> list[str]:
    """ModelOpt's compacted exclusions of BF16 attention: `<layer>.self_attn*` (trailing wildcards only)."""
    return sorted({n.rsplit(".self_attn.", 1)[0] + ".self_attn*" for n in m.names("attn")})


def _qwen36_fp8(m: Model) -> dict:
    """Qwen3.6-27B-FP8: exact names, incl. `mlp.gate` entries and the small linear_attn in_proj_a/b."""
    keep = ["lm_head"] + [n.rsplit(".", 1)[0] + ".gate" for n in m.names("dense") if n.endswith("gate_proj")]
    keep += [n for n in m.names("linear_attn") if n.endswith(("in_proj_a", "in_proj_b"))]
    return qf.hf_fp8(ignore_key="modules_to_not_convert", ignore=keep)


_QWEN36 = {
    "arch": "qwen3_5_dense",
    "quant": {"attn": "fp8_block", "linear_attn": "fp8_block", "dense": "fp8_block"},
    "qconfig": _qwen36_fp8,
    "mutate": (store_as(r"linear_attn\.in_proj_[ab]\.", "bf16"),),
}


MORE_CASES: list[Case] = [
    # ---- Hugging Face fp8 (FineGrainedFP8) ---------------------------------------------------------
    Case(
        "fp8-deepseek-v3-release",
        "deepseek-ai/DeepSeek-V3: fp8 block 128x128, no exclusion list, BF16 router",
        "hf:deepseek-ai/DeepSeek-V3",
        "the official release; vLLM and SGLang build the DeepSeek router without a "
        "quant config, so no list is needed",
        "deepseek_v3",
        {"attn": "fp8_block", "dense": "fp8_block", "shared": "fp8_block", "expert": "fp8_block"},
        lambda m: qf.hf_fp8(),
        {"vllm": LOADS, "sglang": LOADS},
        arch_kwargs={**W4, "q_lora": 128},
        published="deepseek-ai/DeepSeek-V3",
    ),
    Case(
        "fp8-qwen3moe-release",
        "Qwen/Qwen3-30B-A3B-FP8: fp8 block, modules_to_not_convert by exact name",
        "vllm-project/llm-compressor#1758",
        "the official release whose config the thread quotes; it loads",
        "qwen3_moe",
        {"attn": "fp8_block", "expert": "fp8_block"},
        lambda m: qf.hf_fp8(
            ignore_key="modules_to_not_convert",
            ignore=[
                "lm_head",
                *routers(m),
                *sorted(n.rsplit(".", 1)[0] for n in m.extras if "layernorm" in n),
            ],
        ),
        {"vllm": LOADS, "sglang": LOADS},
        arch_kwargs=FP8_BLOCK_DIMS,
        published="Qwen/Qwen3-30B-A3B-FP8",
    ),
    Case(
        "fp8-mlp-gate-substring-sglang-0.5.10",
        "Qwen3.6-27B-FP8 on SGLang <= 0.5.10: `mlp.gate` hits gate_up_proj",
        "sgl-project/sglang#23687",
        "substring match built gate_up_proj BF16: 'Parameter ...gate_up_proj.weight_scale_inv not found', garbage",
        **_QWEN36,
        expect={"vllm": LOADS, "sglang": WRONG},
        cli=("--engine-version", "sglang=0.5.10"),
        published="Qwen/Qwen3.6-27B-FP8",
    ),
    Case(
        "fp8-mlp-gate-dot-boundary-sglang-newest",
        "Qwen3.6-27B-FP8 on SGLang >= 0.5.11 (dot-boundary matching)",
        "sgl-project/sglang#23467",
        "the fix: `mlp.gate` no longer matches gate_up_proj; the release loads",
        **_QWEN36,
        expect={"vllm": LOADS, "sglang": LOADS},
        published="Qwen/Qwen3.6-27B-FP8",
    ),
    Case(
        "fp8-block-moe-intermediate-not-divisible-at-tp4",
        "Qwen3-30B-A3B-FP8 dims (moe_intermediate 768) served at TP=4: 192 per rank",
        "vllm-project/vllm#17569",
        "ValueError: The output_size of gate's and up's weight = 192 is not divisible by weight quantization "
        "block_n = 128",
        "qwen3_moe",
        {"attn": "fp8_block", "expert": "fp8_block"},
        lambda m: qf.hf_fp8(ignore_key="modules_to_not_convert", ignore=["lm_head", *routers(m)]),
        {"vllm": FAILS},
        arch_kwargs={"hidden": 128, "inter": 768, "hd": 128, "kv": 4},
        cli=("--tensor-parallel-size", "4"),
    ),
    # ---- mxfp4 (GPT-OSS) ---------------------------------------------------------------------------
    Case(
        "mxfp4-gpt-oss-release",
        "openai/gpt-oss-20b: MXFP4 fused experts, everything else BF16",
        "hf:openai/gpt-oss-20b",
        "the official release, served by vLLM and SGLang",
        "gpt_oss",
        {"expert": "mxfp4_gpt_oss"},
        lambda m: qf.mxfp4(),
        {"vllm": LOADS, "sglang": LOADS},
        published="openai/gpt-oss-20b",
    ),
    Case(
        "mxfp4-gpt-oss-bf16-experts",
        "GPT-OSS-20B dequantized to BF16 experts (mxfp4 config kept)",
        "vllm-project/vllm#45830",
        "GptOssForCausalLM fails at load: KeyError: 'layers.0.mlp.experts.w2_weight'",
        "gpt_oss",
        {},
        lambda m: qf.mxfp4(),
        {"vllm": FAILS},
        published="unsloth/gpt-oss-20b-BF16",
    ),
    # ---- GPTQ / GPTQModel dynamic --------------------------------------------------------------------
    Case(
        "gptq-qwen3moe-release",
        "Qwen/Qwen3-30B-A3B-GPTQ-Int4: int4 g128 attention + experts, BF16 router",
        "vllm-project/vllm#22017",
        "Qwen3-MoE GPTQ loads (the PR fixed the ROCm-only gate g_idx KeyError)",
        "qwen3_moe",
        {"attn": "gptq_int4", "expert": "gptq_int4"},
        lambda m: qf.gptq(),
        {"vllm": LOADS, "sglang": LOADS},
        arch_kwargs={**W4, "hd": 32},
        published="Qwen/Qwen3-30B-A3B-GPTQ-Int4",
    ),
    Case(
        "gptq-qwen3moe-mixed-experts-in-layer",
        "GPTQModel Qwen3-Omni-30B-A3B: quantized and BF16 experts in one layer",
        "ModelCloud/GPTQModel#2221",
        "vLLM qwen3_moe load_weights: KeyError: 'layers.0.mlp.experts.w2_weight'",
        "qwen3_moe",
        {"attn": "gptq_int4", "expert": "gptq_int4"},
        lambda m: qf.gptq(),
        {"vllm": FAILS},
        arch_kwargs={**W4, "hd": 32},
        mutate=(store_as(r"layers\.0\.mlp\.experts\.[13]\.", "bf16"),),
    ),
    Case(
        "gptq-dynamic-deepseek-int4-int8-mix",
        "DeepSeek-R1 GPTQ Int4/Int8 mix via GPTQModel `dynamic` overrides",
        "vllm-project/vllm#19395",
        "dynamic per-module overrides honoured for MoE by gptq_marlin; the QuantTrio release validates",
        "deepseek_v3",
        {"expert": "gptq_int4", "shared": "gptq_int8", "dense": "gptq_int8"},
        lambda m: qf.gptq(
            dynamic={
                r"-:.*\.self_attn\..*": {},
                r"+:.*\.shared_experts\..*": {"bits": 8},
                r"+:model\.layers\.0\.mlp\..*": {"bits": 8},
            }
        ),
        {"vllm": LOADS},
        arch_kwargs=W4,
        published="QuantTrio/DeepSeek-R1-0528-GPTQ-Int4-Int8Mix-Medium",
    ),
    Case(
        "gptq-dynamic-bf16-moe-layer-per-expert-rule",
        "GPTQModel dynamic: a BF16 MoE layer skipped by per-expert rules",
        "ModelCloud/GPTQModel#1455",
        "DeepSeek-V2-Lite int8 `dynamic` export with layer-21 experts BF16: vLLM built w2_qweight, KeyError "
        "'model.layers.21.mlp.experts.w2_weight'; since vllm PR #19395 only a `-:` rule matching the fused "
        "`...mlp.experts` prefix keeps a MoE BF16, which per-expert rules never do",
        "deepseek_v3",
        {"expert": "gptq_int4", "shared": "gptq_int4"},
        lambda m: qf.gptq(
            dynamic={
                r"-:.*\.self_attn\..*": {},
                r"-:model\.layers\.0\.mlp\..*": {},
                r"-:model\.layers\.2\.mlp\.experts\.\d+\..*": {},
            }
        ),
        {"vllm": FAILS},
        arch_kwargs=W4,
        mutate=(store_as(r"layers\.2\.mlp\.experts\.", "bf16"),),
    ),
    # ---- AWQ ----------------------------------------------------------------------------------------
    Case(
        "awq-mixtral-release",
        "casperhansen/mixtral-instruct-awq: AutoAWQ GEMM int4, router `gate` not converted",
        "hf:casperhansen/mixtral-instruct-awq",
        "AutoAWQ's Mixtral release served by vLLM (awq_marlin)",
        "mixtral",
        {"attn": "awq_int4", "expert": "awq_int4"},
        lambda m: qf.awq(not_convert=["gate"]),
        {"vllm": LOADS},
        published="casperhansen/mixtral-instruct-awq",
    ),
    Case(
        "awq-qwen3_5moe-layer0-experts-bf16",
        "QuantTrio/Qwen3.5-397B-A17B-AWQ: layer-0 experts BF16, `model.layers.0.`",
        "sgl-project/sglang#20439",
        "vLLM serves it (substring entry excludes the MoE); SGLang's FusedMoE ignores modules_to_not_convert: "
        "KeyError 'model.layers.0.mlp.experts.w13_weight'",
        "qwen3_5_moe",
        {"expert": "awq_int4"},
        lambda m: qf.awq(
            not_convert=["model.layers.0.", "self_attn", "shared_expert", "linear_attn", "mlp.gate"]
        ),
        {"vllm": LOADS, "sglang": FAILS},
        arch_kwargs=W4,
        mutate=(store_as(r"layers\.0\.mlp\.experts\.", "bf16"),),
        published="QuantTrio/Qwen3.5-397B-A17B-AWQ",
    ),
    Case(
        "awq-deepseek-bf16-moe-layer-derived-list",
        "DeepSeek-V3.1-AWQ with one MoE layer BF16, no layer entry",
        "vllm-project/vllm#24208",
        "KeyError: 'model.layers.60.mlp.experts.w2_weight' (derived per-expert names never match the fused MoE)",
        "deepseek_v3",
        {"expert": "awq_int4", "shared": "awq_int4"},
        lambda m: qf.awq(not_convert=None),
        {"vllm": FAILS},
        arch_kwargs=W4,
        mutate=(store_as(r"layers\.2\.mlp\.experts\.", "bf16"),),
        published="tclf90/DeepSeek-V3.1-AWQ",
    ),
    # ---- formats we do not model: honest `unknown` ---------------------------------------------------
    Case(
        "bitsandbytes-nf4-unknown",
        "unsloth/Llama-3.3-70B-Instruct-bnb-4bit: bitsandbytes NF4",
        "vllm-project/vllm#11010",
        "vLLM 0.6.4 KeyError 'layers.0.mlp.down_proj.weight.absmax'; the outcome "
        "depends on the bnb loader version: the validator must say unknown",
        "llama",
        {"attn": "bnb_nf4", "dense": "bnb_nf4"},
        lambda m: qf.bitsandbytes_nf4(),
        {"vllm": UNKNOWN, "sglang": UNKNOWN},
        published="unsloth/Llama-3.3-70B-Instruct-bnb-4bit",
    ),
    Case(
        "quark-fp8-moe-unknown",
        "AMD Quark FP8 MoE export (quant_method quark)",
        "vllm-project/vllm#46757",
        "Quark exclusion of per-expert entries changed between releases: the validator must say unknown, not run "
        "ModelOpt rules on look-alike tensors",
        "qwen3_moe",
        {"attn": "modelopt_fp8", "expert": "modelopt_fp8"},
        lambda m: qf.quark_fp8(["lm_head", *routers(m)]),
        {"vllm": UNKNOWN, "sglang": UNKNOWN},
    ),
    # ---- name space, integrity, engine facts per architecture ---------------------------------------
    Case(
        "index-names-scale-missing-from-shard",
        "Qwen3-30B-A3B NVFP4 whose index lists an input_scale the shard lacks",
        "vllm-project/vllm#57108",
        "vLLM reads shards, not the index, and does not track quantized params: the "
        "expert runs with an unset input scale",
        "qwen3_moe",
        MOE_NVFP4,
        lambda m: qf.modelopt("NVFP4", ["lm_head", *routers(m)]),
        {"vllm": WRONG},
        shards=2,
        mutate=(drop(r"layers\.1\.mlp\.experts\.3\.down_proj\.input_scale$"),),
        index_extra={
            "model.layers.1.mlp.experts.3.down_proj.input_scale": "model-00002-of-00002.safetensors"
        },
    ),
    Case(
        "modelopt-nvfp4-deepseek-router-unlisted-release",
        "nvidia/DeepSeek-R1-FP4: NVFP4 MLPs, routers not listed",
        "hf:nvidia/DeepSeek-R1-FP4",
        "published; vLLM builds DeepseekV2 `mlp.gate` without a quant config, SGLang's "
        "MoEGate is a plain parameter: loads without exclusion entries",
        "deepseek_v3",
        {"expert": NV, "shared": NV, "dense": NV},
        lambda m: qf.modelopt("NVFP4", ["lm_head", *_attn_wildcards(m)]),
        {"vllm": LOADS, "sglang": LOADS},
        published="nvidia/DeepSeek-R1-FP4",
    ),
]
