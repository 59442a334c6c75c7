"""Architecture templates of the corpus: the real tensor names and relative structure of each released
model family, at tiny dims (what `corpus_build.Model` holds before a format stores it)."""

from __future__ import annotations

from collections.abc import Callable

from corpus_build import Experts, Linear, Model, Spec


def _norm(h: int) -> Spec:
    return ("BF16", (h,), 1.0)


def _attn(
    m: Model, p: str, h: int, heads: int, kv: int, hd: int, *, qk_norm: bool = True, bias: bool = False
) -> None:
    for proj, out, inp in (
        ("q_proj", heads * hd, h),
        ("k_proj", kv * hd, h),
        ("v_proj", kv * hd, h),
        ("o_proj", h, heads * hd),
    ):
        m.linears.append(Linear(f"{p}.self_attn.{proj}", out, inp, "attn"))
        if bias:
            m.extras[f"{p}.self_attn.{proj}.bias"] = ("BF16", (out,), None)
    if qk_norm:
        m.extras[f"{p}.self_attn.q_norm.weight"] = _norm(hd)
        m.extras[f"{p}.self_attn.k_norm.weight"] = _norm(hd)


def _mlp(m: Model, p: str, h: int, inter: int, kind: str = "dense") -> None:
    for proj, out, inp in (("gate_proj", inter, h), ("up_proj", inter, h), ("down_proj", h, inter)):
        m.linears.append(Linear(f"{p}.{proj}", out, inp, kind))


def _common(m: Model, root: str, h: int, vocab: int, *, lm_head: str = "lm_head") -> None:
    m.extras[f"{root}.embed_tokens.weight"] = ("BF16", (vocab, h), None)
    m.extras[f"{root}.norm.weight"] = _norm(h)
    m.linears.append(Linear(lm_head, vocab, h, "lm_head"))


def qwen3_moe(
    *,
    layers: int = 2,
    experts: int = 4,
    hidden: int = 64,
    inter: int = 32,
    vocab: int = 96,
    hd: int = 16,
    kv: int = 2,
    arch: str = "Qwen3MoeForCausalLM",
) -> Model:
    """Qwen3-30B-A3B: every layer MoE, router `mlp.gate` [E, H], per-expert 2-D experts, q/k norms."""
    heads = 4
    cfg = {
        "architectures": [arch],
        "model_type": "qwen3_moe",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": inter,
        "intermediate_size": inter * 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    m = Model(arch, cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        _attn(m, p, hidden, heads, kv, hd)
        m.linears.append(Linear(f"{p}.mlp.gate", experts, hidden, "router"))
        m.experts.append(Experts(f"{p}.mlp.experts", experts, inter, hidden))
    _common(m, "model", hidden, vocab)
    return m


def qwen3_5_moe(
    *,
    layers: int = 2,
    experts: int = 4,
    hidden: int = 64,
    inter: int = 32,
    vocab: int = 96,
    hd: int = 16,
    k_dim: int = 16,
    root: str = "model.language_model",
) -> Model:
    """Qwen3.5/3.6-MoE (text tower of Qwen3_5MoeForConditionalGeneration): gated-delta `linear_attn` and
    full attention alternate; `mlp.gate`, `mlp.shared_expert.*`, `mlp.shared_expert_gate` [1, H]."""
    heads, kv, v_heads = 4, 2, 4
    text = {
        "model_type": "qwen3_5_moe_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_experts": experts,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": inter,
        "shared_expert_intermediate_size": inter,
        "vocab_size": vocab,
        "layer_types": ["linear_attention", "full_attention"] * (layers // 2),
    }
    cfg = {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    m = Model("Qwen3_5MoeForConditionalGeneration", cfg, [], [])
    for n in range(layers):
        p = f"{root}.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        if n % 2 == 0:
            la = f"{p}.linear_attn"
            for proj, out, inp in (
                ("in_proj_qkv", 2 * k_dim * 2 + v_heads * hd, hidden),
                ("in_proj_z", v_heads * hd, hidden),
                ("in_proj_b", v_heads, hidden),
                ("in_proj_a", v_heads, hidden),
                ("out_proj", hidden, v_heads * hd),
            ):
                m.linears.append(Linear(f"{la}.{proj}", out, inp, "linear_attn"))
            m.extras[f"{la}.conv1d.weight"] = ("BF16", (2 * k_dim * 2 + v_heads * hd, 1, 4), None)
            m.extras[f"{la}.A_log"] = ("F32", (v_heads,), 0.0)
            m.extras[f"{la}.dt_bias"] = ("BF16", (v_heads,), 1.0)
            m.extras[f"{la}.norm.weight"] = _norm(hd)
        else:
            _attn(m, p, hidden, heads, kv, hd)
        m.linears.append(Linear(f"{p}.mlp.gate", experts, hidden, "router"))
        m.linears.append(Linear(f"{p}.mlp.shared_expert_gate", 1, hidden, "router"))
        _mlp(m, f"{p}.mlp.shared_expert", hidden, inter, "shared")
        m.experts.append(Experts(f"{p}.mlp.experts", experts, inter, hidden))
    _common(m, root, hidden, vocab)
    return m


def deepseek_v3(
    *, layers: int = 3, experts: int = 4, hidden: int = 64, inter: int = 32, vocab: int = 96, q_lora: int = 48
) -> Model:
    """DeepSeek-V3/R1: MLA attention, layer 0 dense (`first_k_dense_replace`), then MoE layers with the
    router `mlp.gate` [E, H] + `e_score_correction_bias`, one shared expert, per-expert 2-D experts."""
    heads, kv_lora, nope, rope, vd = 4, 32, 16, 8, 16
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_routed_experts": experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": inter,
        "intermediate_size": inter * 4,
        "first_k_dense_replace": 1,
        "q_lora_rank": q_lora,
        "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope,
        "qk_rope_head_dim": rope,
        "v_head_dim": vd,
        "n_group": 2,
        "topk_group": 1,
        "num_nextn_predict_layers": 1,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    m = Model("DeepseekV3ForCausalLM", cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        a = f"{p}.self_attn"
        for proj, out, inp in (
            ("q_a_proj", q_lora, hidden),
            ("q_b_proj", heads * (nope + rope), q_lora),
            ("kv_a_proj_with_mqa", kv_lora + rope, hidden),
            ("kv_b_proj", heads * (nope + vd), kv_lora),
            ("o_proj", hidden, heads * vd),
        ):
            m.linears.append(Linear(f"{a}.{proj}", out, inp, "attn"))
        m.extras[f"{a}.q_a_layernorm.weight"] = _norm(q_lora)
        m.extras[f"{a}.kv_a_layernorm.weight"] = _norm(kv_lora)
        if n == 0:
            _mlp(m, f"{p}.mlp", hidden, inter * 4)
            continue
        m.linears.append(Linear(f"{p}.mlp.gate", experts, hidden, "router"))
        m.extras[f"{p}.mlp.gate.e_score_correction_bias"] = ("F32", (experts,), 0.0)
        _mlp(m, f"{p}.mlp.shared_experts", hidden, inter, "shared")
        m.experts.append(Experts(f"{p}.mlp.experts", experts, inter, hidden))
    _common(m, "model", hidden, vocab)
    return m


def mixtral(
    *, layers: int = 2, experts: int = 4, hidden: int = 128, inter: int = 128, vocab: int = 96
) -> Model:
    """Mixtral-8x7B: `block_sparse_moe.gate` router, experts `block_sparse_moe.experts.{e}.w1/w3/w2`."""
    heads, kv, hd = 4, 2, 32
    cfg = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "num_local_experts": experts,
        "num_experts_per_tok": 2,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    m = Model("MixtralForCausalLM", cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        _attn(m, p, hidden, heads, kv, hd, qk_norm=False)
        m.linears.append(Linear(f"{p}.block_sparse_moe.gate", experts, hidden, "router"))
        m.experts.append(Experts(f"{p}.block_sparse_moe.experts", experts, inter, hidden, ("w1", "w3", "w2")))
    _common(m, "model", hidden, vocab)
    return m


def gemma4(*, layers: int = 2, experts: int = 4, hidden: int = 64, inter: int = 32, vocab: int = 96) -> Model:
    """Gemma-4-26B-A4B text tower (Gemma4ForCausalLM naming): fused experts at `layers.N.experts`
    ([E, 2I, H] / [E, H, I]) beside a dense `mlp`, router `router.proj` + `router.scale` buffers."""
    heads, kv, hd = 4, 2, 16
    cfg = {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_experts": experts,
        "top_k_experts": 2,
        "moe_intermediate_size": inter,
        "intermediate_size": inter,
        "enable_moe_block": True,
        "vocab_size": vocab,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    m = Model("Gemma4ForCausalLM", cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        for norm in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
            "pre_feedforward_layernorm_2",
            "post_feedforward_layernorm_1",
            "post_feedforward_layernorm_2",
        ):
            m.extras[f"{p}.{norm}.weight"] = _norm(hidden)
        _attn(m, p, hidden, heads, kv, hd)
        _mlp(m, f"{p}.mlp", hidden, inter)
        m.linears.append(Linear(f"{p}.router.proj", experts, hidden, "router"))
        m.extras[f"{p}.router.scale"] = ("BF16", (hidden,), 1.0)
        m.extras[f"{p}.router.per_expert_scale"] = ("BF16", (experts,), 1.0)
        m.extras[f"{p}.layer_scalar"] = ("BF16", (1,), 1.0)
        m.experts.append(Experts(f"{p}.experts", experts, inter, hidden, fused="gemma4"))
    m.extras["model.embed_tokens.weight"] = ("BF16", (vocab, hidden), None)
    m.extras["model.norm.weight"] = _norm(hidden)
    return m


def gpt_oss(
    *, layers: int = 2, experts: int = 4, hidden: int = 64, inter: int = 64, vocab: int = 96
) -> Model:
    """gpt-oss-20b/120b: attention with biases and `sinks`, `mlp.router` (+bias), fused experts."""
    heads, kv, hd = 4, 2, 16
    cfg = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "num_local_experts": experts,
        "experts_per_token": 2,
        "num_experts_per_tok": 2,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "sliding_window": 128,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    m = Model("GptOssForCausalLM", cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        _attn(m, p, hidden, heads, kv, hd, qk_norm=False, bias=True)
        m.extras[f"{p}.self_attn.sinks"] = ("BF16", (heads,), 0.0)
        m.linears.append(Linear(f"{p}.mlp.router", experts, hidden, "router"))
        m.extras[f"{p}.mlp.router.bias"] = ("BF16", (experts,), None)
        m.experts.append(Experts(f"{p}.mlp.experts", experts, inter, hidden, fused="gpt_oss"))
    _common(m, "model", hidden, vocab)
    return m


def qwen3_5_dense(
    *, layers: int = 2, hidden: int = 128, inter: int = 256, vocab: int = 96, hd: int = 64, k_dim: int = 32
) -> Model:
    """Qwen3.6-27B / Qwen3.8-27B (dense Qwen3_5ForConditionalGeneration text tower): `linear_attn` and
    full attention alternate, a dense gated MLP."""
    m = qwen3_5_moe(layers=layers, experts=1, hidden=hidden, inter=inter, vocab=vocab, hd=hd, k_dim=k_dim)
    m.arch = "Qwen3_5ForConditionalGeneration"
    m.config["architectures"] = [m.arch]
    m.config["model_type"] = "qwen3_5"
    text = m.config["text_config"]
    for key in (
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
    ):
        text.pop(key)
    text.update(model_type="qwen3_5_text", intermediate_size=inter)
    m.experts = []
    m.linears = [lin for lin in m.linears if lin.kind not in ("router", "shared")]
    for n in range(layers):
        _mlp(m, f"model.language_model.layers.{n}.mlp", hidden, inter)
    return m


def llama(*, layers: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 96) -> Model:
    """Llama-3.1-8B-Instruct: dense attention + gated MLP."""
    heads, kv, hd = 4, 2, 16
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": hd,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    m = Model("LlamaForCausalLM", cfg, [], [])
    for n in range(layers):
        p = f"model.layers.{n}"
        m.extras[f"{p}.input_layernorm.weight"] = _norm(hidden)
        m.extras[f"{p}.post_attention_layernorm.weight"] = _norm(hidden)
        _attn(m, p, hidden, heads, kv, hd, qk_norm=False)
        _mlp(m, f"{p}.mlp", hidden, inter)
    _common(m, "model", hidden, vocab)
    return m


ARCHS: dict[str, Callable[..., Model]] = {
    "qwen3_moe": qwen3_moe,
    "qwen3_5_moe": qwen3_5_moe,
    "deepseek_v3": deepseek_v3,
    "mixtral": mixtral,
    "gemma4": gemma4,
    "gpt_oss": gpt_oss,
    "qwen3_5_dense": qwen3_5_dense,
    "llama": llama,
}
