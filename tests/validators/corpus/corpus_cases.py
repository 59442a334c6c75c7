"""The corpus: checkpoints rebuilt from public bug reports, PRs and releases, and what the engine did.

`thread` is the public source (`owner/repo#N`; `hf:org/name` for a published release served by the
engines without a report). `did` says what the engine did with the real checkpoint. Engines absent
from `expect` are not asserted (the source says nothing about them). The table in README.md lists
every case.
"""

from __future__ import annotations

import corpus_configs as qf
from corpus_build import Model
from corpus_cases_more import MORE_CASES
from corpus_formats import NVFP4_W2
from corpus_spec import FAILS, LOADS, WRONG, Case, drop, fill, rename, routers, store_as

NV = "modelopt_nvfp4"
MOE_NVFP4 = {"attn": NV, "expert": NV}
W4 = {"hidden": 128, "inter": 128}  # group-128 formats need in_features % 128 == 0


def _mo(algo: str, *extra: str, with_routers: bool = True):
    return lambda m: qf.modelopt(algo, ["lm_head", *extra, *(routers(m) if with_routers else [])])


def _ct_mixed(m: Model) -> dict:
    """unsloth/Qwen3.8-27B-NVFP4: NVFP4 MLP in the first layers, FP8 per-channel linear_attn / last MLP / lm_head."""
    nvfp4 = [n for n in m.names("dense") if ".layers.0." in n]
    fp8 = [n for n in m.names("dense") + m.names("linear_attn") + m.names("attn") if n not in nvfp4] + [
        "lm_head"
    ]
    ignore = [n for n in m.names("linear_attn") if n.endswith(("in_proj_a", "in_proj_b"))]
    return qf.compressed_tensors(
        "mixed-precision",
        ignore,
        groups={
            "group_0": ("nvfp4-pack-quantized", nvfp4),
            "group_1": ("float-quantized", [n for n in fp8 if n not in ignore]),
        },
    )


MODELOPT_CT_CASES: list[Case] = [
    # ---- ModelOpt NVFP4 / FP8 ----------------------------------------------------------------------
    Case(
        "modelopt-nvfp4-qwen3moe-release",
        "nvidia/Qwen3-30B-A3B-FP4: NVFP4 attention + experts, routers excluded",
        "NVIDIA/Model-Optimizer#1858",
        "reference export the PR cites: every mlp.gate BF16 and listed; loads",
        "qwen3_moe",
        MOE_NVFP4,
        _mo("NVFP4"),
        {"vllm": LOADS, "sglang": LOADS},
        published="nvidia/Qwen3-30B-A3B-FP4",
    ),
    Case(
        "modelopt-nvfp4-qwen3moe-router-unlisted",
        "Qwen3-30B-A3B NVFP4 from transformers 5: BF16 router not excluded",
        "NVIDIA/Model-Optimizer#1858",
        "vLLM builds an NVFP4 gate: AssertionError: Tried to load weights of size [128, 2048] to a parameter of "
        "size [128, 1024]",
        "qwen3_moe",
        MOE_NVFP4,
        _mo("NVFP4", with_routers=False),
        {"vllm": FAILS},
        codes=("QG201",),
    ),
    Case(
        "modelopt-nvfp4-gemma4-bf16-fused-experts",
        "Gemma-4-26B-A4B NVFP4 with the fused 3-D experts left BF16",
        "NVIDIA/Model-Optimizer#1173",
        "ModelOpt 0.41-0.43 skipped the fused experts (~91% of weights BF16, config still NVFP4; fixed by PR #1219); "
        "vLLM's NVFP4 MoE expects packed U8: size-mismatch RuntimeError",
        "gemma4",
        {"attn": NV, "dense": NV},
        _mo("NVFP4"),
        {"vllm": FAILS},
        codes=("QG202",),
    ),
    Case(
        "modelopt-nvfp4-gemma4-missing-expert-input-scale",
        "Gemma-4-26B-A4B NVFP4: uncalibrated experts lack input_scale",
        "vllm-project/vllm#45212",
        "missing per-expert input_scale loads as zeros -> 1/0 -> NaN / pad tokens, no error",
        "gemma4",
        {"attn": NV, "dense": NV, "expert": NV},
        _mo("NVFP4"),
        {"vllm": WRONG},
        mutate=(drop(r"layers\.1\.experts\.[23]\.(gate|up)_proj\.input_scale$"),),
        published="bg-digitalservices/Gemma-4-26B-A4B-it-NVFP4",
    ),
    Case(
        "modelopt-nvfp4-gemma4-zero-expert-input-scale",
        "Gemma-4-26B-A4B NVFP4: zero input_scale on some experts",
        "vllm-project/vllm#45320",
        "proposed check: 'w13_input_scale' has zero or non-finite values for expert ids [40, 42, 82, 98]; "
        "without it vLLM serves NaN",
        "gemma4",
        {"attn": NV, "dense": NV, "expert": NV},
        _mo("NVFP4"),
        {"vllm": WRONG},
        mutate=(fill(r"layers\.0\.experts\.[13]\.(gate|up)_proj\.input_scale$", 0.0),),
        codes=("QG502",),
    ),
    Case(
        "modelopt-nvfp4-weight-only-declared-w4a4",
        "weight-only NVFP4 MoE data declared as NVFP4 (W4A4)",
        "vllm-project/vllm#54189",
        "uninitialised input scales folded in: every expert output 0, repeated token, no warning",
        "qwen3_moe",
        MOE_NVFP4,
        _mo("NVFP4"),
        {"vllm": WRONG},
        mutate=(drop(r"\.input_scale$"),),
    ),
    Case(
        "modelopt-nvfp4-lm-head-excluded-but-quantized",
        "Qwen3.6-35B-A3B NVFP4: lm_head excluded yet stored NVFP4",
        "vllm-project/vllm#44081",
        "ValueError: There is no module or parameter named 'lm_head.input_scale'",
        "qwen3_5_moe",
        {"expert": NV, "shared": NV, "lm_head": NV},
        lambda m: qf.modelopt(
            "NVFP4",
            [
                "lm_head",
                *routers(m),
                *(
                    n + "*"
                    for n in sorted({x.rsplit(".", 1)[0] for x in m.names("attn") + m.names("linear_attn")})
                ),
            ],
        ),
        {"vllm": FAILS},
        published="nvidia/Qwen3.6-35B-A3B-NVFP4",
    ),
    Case(
        "modelopt-nvfp4-expert-index-after-projection",
        "ModelOpt >= 0.43 Qwen3-VL-MoE: experts.gate_proj.0.* names",
        "vllm-project/vllm#40885",
        "names experts.<proj>.<e> instead of experts.<e>.<proj>: IndexError: Dimension out of range at load",
        "qwen3_moe",
        MOE_NVFP4,
        _mo("NVFP4"),
        {"vllm": FAILS},
        mutate=(rename(r"experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.", r"experts.\2.\1."),),
    ),
    Case(
        "modelopt-nvfp4-gate-up-global-scale-mismatch",
        "Qwen3.5-MoE NVFP4: uncalibrated experts' w1/w3 weight_scale_2 differ",
        "NVIDIA/Model-Optimizer#1411",
        "vLLM warns 'w1_weight_scale_2 must match w3_weight_scale_2', uses the gate's and answers 1\\n1\\n1...",
        "qwen3_5_moe",
        {"expert": NV, "shared": NV},
        lambda m: qf.modelopt(
            "NVFP4",
            [
                "lm_head",
                *routers(m),
                *(
                    n + "*"
                    for n in sorted({x.rsplit(".", 1)[0] for x in m.names("attn") + m.names("linear_attn")})
                ),
            ],
        ),
        {"vllm": WRONG},
        mutate=(fill(r"layers\.1\.mlp\.experts\.[0-3]\.up_proj\.weight_scale_2$", NVFP4_W2 * 1.7),),
        codes=("QG404",),
    ),
    Case(
        "modelopt-fp8-llama-release",
        "nvidia/Llama-3.1-8B-Instruct-FP8: ModelOpt FP8 per-tensor, lm_head excluded",
        "hf:nvidia/Llama-3.1-8B-Instruct-FP8",
        "published ModelOpt FP8 release served by vLLM and SGLang",
        "llama",
        {"attn": "modelopt_fp8", "dense": "modelopt_fp8"},
        _mo("FP8"),
        {"vllm": LOADS, "sglang": LOADS},
        published="nvidia/Llama-3.1-8B-Instruct-FP8",
    ),
    Case(
        "modelopt-fp8-experts-without-input-scale",
        "Qwen3.6-35B-A3B ModelOpt FP8: fused experts never calibrated",
        "NVIDIA/Model-Optimizer#1340",
        "grouped_mm bypassed the quantizers: experts exported without input_scale; served output is token salad",
        "qwen3_moe",
        {"attn": "modelopt_fp8", "expert": "modelopt_fp8"},
        _mo("FP8"),
        {"vllm": WRONG},
        mutate=(drop(r"experts\.\d+\.\w+\.input_scale$"),),
    ),
    # ---- compressed-tensors ------------------------------------------------------------------------
    Case(
        "ct-nvfp4-qwen3moe-release",
        "RedHatAI/Qwen3-30B-A3B-NVFP4: llm-compressor NVFP4, routers + lm_head ignored",
        "hf:RedHatAI/Qwen3-30B-A3B-NVFP4",
        "published llm-compressor NVFP4 MoE release served by vLLM",
        "qwen3_moe",
        {"attn": "ct_nvfp4", "expert": "ct_nvfp4"},
        lambda m: qf.compressed_tensors("nvfp4-pack-quantized", ["lm_head", *routers(m)]),
        {"vllm": LOADS, "sglang": LOADS},
        published="RedHatAI/Qwen3-30B-A3B-NVFP4",
    ),
    Case(
        "ct-nvfp4-qwen3_5moe-gdn-conv1d-unlisted",
        "llm-compressor NVFP4 Qwen3.5-MoE: linear_attn ignored by name, GDN conv1d (nn.Conv1d) never listed",
        "vllm-project/llm-compressor#2568",
        "the maintainers point to the RedHatAI/Qwen3.5 releases as loading in vLLM; vLLM (qwen3_next.py) and "
        "SGLang build `linear_attn.conv1d` without a quant config, so it needs no ignore entry",
        "qwen3_5_moe",
        {"attn": "ct_nvfp4", "expert": "ct_nvfp4", "shared": "ct_nvfp4"},
        lambda m: qf.compressed_tensors(
            "nvfp4-pack-quantized", ["lm_head", *routers(m), *m.names("linear_attn")]
        ),
        {"vllm": LOADS, "sglang": LOADS},
        arch_kwargs={"hidden": 128, "hd": 32, "k_dim": 32},
    ),
    Case(
        "ct-nvfp4-missing-expert-global-scale",
        "CT NVFP4 MoE with experts lacking weight_global_scale",
        "vllm-project/vllm#54444",
        "global scales are torch.empty and never filled: silent garbage",
        "qwen3_moe",
        {"attn": "ct_nvfp4", "expert": "ct_nvfp4"},
        lambda m: qf.compressed_tensors("nvfp4-pack-quantized", ["lm_head", *routers(m)]),
        {"vllm": WRONG},
        mutate=(drop(r"layers\.1\.mlp\.experts\.2\.\w+\.weight_global_scale$"),),
    ),
    Case(
        "ct-w4a16-kimi-k2-release",
        "RedHatAI/Kimi-K2-Instruct-quantized.w4a16 (DeepSeek-V3 layout), experts W4A16",
        "sgl-project/sglang#9248",
        "W4A16 MoE release the PR runs (Kimi-K2); vLLM serves it",
        "deepseek_v3",
        {"expert": "ct_w4a16", "shared": "ct_w4a16", "dense": "ct_w4a16"},
        lambda m: qf.compressed_tensors("pack-quantized", ["lm_head", *routers(m), *m.names("attn")]),
        {"vllm": LOADS},
        arch_kwargs=W4,
        published="RedHatAI/Kimi-K2-Instruct-quantized.w4a16",
    ),
    Case(
        "ct-w4a16-doubled-language-model-prefix",
        "Qwen3.5-122B-A10B AWQ W4A16 saved as language_model.language_model.*",
        "vllm-project/llm-compressor#2568",
        "KeyError: 'language_model.language_model.layers.0.mlp.experts.w2_weight_packed'",
        "qwen3_5_moe",
        {"expert": "ct_w4a16"},
        lambda m: qf.compressed_tensors(
            "pack-quantized",
            ["lm_head", *routers(m), "re:.*self_attn.*", "re:.*linear_attn.*", "re:.*shared_expert\\..*"],
        ),
        {"vllm": FAILS},
        arch_kwargs=W4,
        mutate=(rename(r"^model\.language_model\.", "model.language_model.language_model.language_model."),),
        codes=("QG701",),
    ),
    Case(
        "ct-w4a16-moe-projections-disagree",
        "CT W4A16 MoE whose down_proj resolves to another scheme than gate/up",
        "vllm-project/vllm#55443",
        "ValueError: All MoE projections need to have same quantization scheme but found multiple",
        "qwen3_moe",
        {"expert": "ct_w4a16"},
        lambda m: qf.compressed_tensors(
            "pack-quantized",
            [
                "lm_head",
                *routers(m),
                *m.names("attn"),
                *(f"{e.prefix}.{i}.down_proj" for e in m.experts for i in range(e.num)),
            ],
        ),
        {"vllm": FAILS},
        arch_kwargs=W4,
        mutate=(store_as(r"experts\.\d+\.down_proj\.", "bf16"),),
    ),
    Case(
        "ct-fp8-qwen3moe-release",
        "RedHatAI/Qwen3-30B-A3B-FP8-dynamic: FP8 per-channel weights, dynamic tokens",
        "hf:RedHatAI/Qwen3-30B-A3B-FP8-dynamic",
        "published llm-compressor FP8_DYNAMIC MoE release served by vLLM",
        "qwen3_moe",
        {"attn": "ct_fp8_dynamic", "expert": "ct_fp8_dynamic"},
        lambda m: qf.compressed_tensors("float-quantized", ["lm_head", *routers(m)]),
        {"vllm": LOADS, "sglang": LOADS},
        published="RedHatAI/Qwen3-30B-A3B-FP8-dynamic",
    ),
    Case(
        "ct-fp8-lm-head-sglang-drops-scale",
        "unsloth/Qwen3.8-27B-NVFP4: CT mixed NVFP4 + FP8 with an FP8 lm_head",
        "sgl-project/sglang#34895",
        "SGLang routes ParallelLMHead to the unquantized method: lm_head.weight_scale dropped, endless repetition; "
        "the same checkpoint serves correctly with vLLM",
        "qwen3_5_dense",
        {
            "dense": "ct_nvfp4",
            "linear_attn": "ct_fp8_dynamic",
            "attn": "ct_fp8_dynamic",
            "lm_head": "ct_fp8_dynamic",
        },
        _ct_mixed,
        {"vllm": LOADS, "sglang": WRONG},
        mutate=(
            store_as(r"layers\.1\.mlp\.", "ct_fp8_dynamic"),
            store_as(r"linear_attn\.in_proj_[ab]\.", "bf16"),
        ),
        published="unsloth/Qwen3.8-27B-NVFP4",
    ),
    Case(
        "ct-mxfp4-qwen3moe-release",
        "nm-testing/Qwen3-30B-A3B-MXFP4A16: CT mxfp4-pack-quantized MoE",
        "vllm-project/vllm#32285",
        "MXFP4 W4A16 CT MoE support; the test model scores GSM8K 0.882 in vLLM",
        "qwen3_moe",
        {"attn": "ct_mxfp4", "expert": "ct_mxfp4"},
        lambda m: qf.compressed_tensors("mxfp4-pack-quantized", ["lm_head", *routers(m)]),
        {"vllm": LOADS},
        arch_kwargs=W4,
        published="nm-testing/Qwen3-30B-A3B-MXFP4A16",
    ),
    Case(
        "ct-mxfp4-bf16-experts-not-ignored",
        "CT MXFP4A16 MoE with one layer's experts left BF16 and not ignored",
        "vllm-project/vllm#41994",
        "same loader path as the PR's CT MoE with BF16 experts outside `ignore`: KeyError 'layers.0.mlp.experts.w2_weight'",
        "qwen3_moe",
        {"attn": "ct_mxfp4", "expert": "ct_mxfp4"},
        lambda m: qf.compressed_tensors("mxfp4-pack-quantized", ["lm_head", *routers(m)]),
        {"vllm": FAILS},
        arch_kwargs=W4,
        mutate=(store_as(r"layers\.1\.mlp\.experts\.", "bf16"),),
    ),
]


CASES: list[Case] = MODELOPT_CT_CASES + MORE_CASES
