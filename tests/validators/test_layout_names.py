"""Layout of synthetic header sets: quantized spellings, fused 3-D variants, odd names, MTP, 180k tensors."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from layout_cases import E, F, H, K, describe, read_checkpoint

from quantgate.validators.layout import SCALE_SUFFIXES, Kind, Layout, build_layout
from quantgate.validators.safetensors_header import TensorInfo
from quantgate.validators.schemes import MODELOPT, scheme


def info(name: str, dtype: str, *shape: int) -> TensorInfo:
    return TensorInfo(name, dtype, tuple(shape), "model.safetensors", 0, 0)


def layout_from(entries: list[TensorInfo], config: Mapping | None = None) -> Layout:
    return build_layout({t.name: t for t in entries}, config)


def test_compressed_tensors_packed_names_give_logical_shapes() -> None:
    p = "model.layers.0.mlp.experts.1.down_proj"
    layout = layout_from(
        [
            info(f"{p}.weight_packed", "I32", 64, 16),
            info(f"{p}.weight_scale", "BF16", 64, 1),
            info(f"{p}.weight_shape", "I64", 2),
            info("model.layers.0.self_attn.q_proj.weight_packed", "U8", 64, 32),
            info("model.layers.0.self_attn.q_proj.weight_scale", "F8_E4M3", 64, 4),
            info("model.layers.0.self_attn.q_proj.weight_global_scale", "F32", 1),
        ]
    )
    assert describe(layout.modules[p]) == (
        K.EXPERT,
        0,
        1,
        "down",
        None,
        "model.layers.0.mlp.experts",
        [64, 128],
    )
    assert describe(layout.modules["model.layers.0.self_attn.q_proj"])[-1] == [64, 64]


def test_transposed_fused_quantized_tensors_keep_their_scales() -> None:
    """ModelOpt keeps Llama4/GPT-OSS experts 3-D: `experts.gate_up_proj` + `..._weight_scale`."""
    x = "model.layers.0.feed_forward.experts"
    layout = layout_from(
        [
            info(f"{x}.gate_up_proj", "F8_E4M3", E, H, 2 * F),
            info(f"{x}.gate_up_proj_weight_scale", "F32", E),
            info(f"{x}.gate_up_proj_input_scale", "F32", E),
            info(f"{x}.down_proj", "F8_E4M3", E, F, H),
        ],
        {"model_type": "llama4_text"},
    )
    gate = layout.modules[f"{x}.0.gate_proj"]
    assert set(gate.tensors) == {"weight", "weight_scale", "input_scale"}
    assert (gate.out_features, gate.in_features, gate.fused.transposed) == (F, H, True)
    assert len(layout.by_kind(Kind.EXPERT)) == E * 3 and not layout.unassigned


def test_orientation_is_inferred_from_hidden_size_without_a_table_entry() -> None:
    x = "model.layers.0.mlp.experts"
    entries = [info(f"{x}.gate_up_proj", "BF16", E, H, 2 * F), info(f"{x}.down_proj", "BF16", E, F, H)]
    transposed = layout_from(entries, {"model_type": "some_new_moe", "hidden_size": H})
    assert transposed.modules[f"{x}.0.down_proj"].fused.transposed
    assert (
        transposed.modules[f"{x}.0.down_proj"].out_features,
        transposed.modules[f"{x}.0.down_proj"].in_features,
    ) == (H, F)
    plain = layout_from(
        [info(f"{x}.gate_up_proj", "BF16", E, 2 * F, H), info(f"{x}.down_proj", "BF16", E, H, F)],
        {"hidden_size": H},
    )
    assert not plain.modules[f"{x}.0.up_proj"].fused.transposed


def test_deepseek_mtp_layer_is_other_with_role_mtp(tiny_model: Callable[..., Path]) -> None:
    tensors, config = read_checkpoint(tiny_model("deepseek_v3"))
    mtp = f"model.layers.{config['num_hidden_layers']}"
    extra = [
        info(f"{mtp}.eh_proj.weight", "BF16", H, 2 * H),
        info(f"{mtp}.enorm.weight", "BF16", H),
        info(f"{mtp}.mlp.experts.0.gate_proj.weight", "BF16", F, H),
        info(f"{mtp}.shared_head.head.weight", "BF16", 1000, H),
    ]
    layout = build_layout({**tensors, **{t.name: t for t in extra}}, config)
    for t in extra:
        m = layout.modules[t.name.removesuffix(".weight")]
        assert (m.kind, m.role, m.layer, m.moe_group) == (
            Kind.OTHER,
            "mtp",
            config["num_hidden_layers"],
            None,
        )
    assert layout.num_layers == config["num_hidden_layers"]


def test_buffers_kv_scales_and_odd_names() -> None:
    layout = layout_from(
        [
            info("model.layers.0.self_attn.k_proj.weight", "F8_E4M3", 32, 64),
            info("model.layers.0.self_attn.k_proj.weight_scale", "F32"),
            info("model.layers.0.self_attn.k_proj.input_scale", "F32"),
            info("model.layers.0.self_attn.k_proj.k_scale", "F32"),  # KV scale under the k_proj module
            info("model.layers.0.self_attn.k_scale", "F32"),  # KV scale with no module
            info("model.layers.0.mlp.router.bias", "BF16", 8),  # a bias alone is not a module
            info("model.layers.0.some_adapter.weight", "BF16", 16, 64),  # unknown: still a module, kind other
            info("model.layers.0.mlp.experts.gate_proj.0.weight", "BF16", F, H),  # wrong order: not an expert
            info("weight", "BF16", 4),  # no module name at all
            info("model.vision_model.blocks.weight", "BF16", 4, 4),
            info("model.multi_modal_projector.linear_1.weight", "BF16", 64, 32),
        ],
        config=None,
    )
    k = layout.modules["model.layers.0.self_attn.k_proj"]
    assert (
        set(k.tensors) == {"weight", "weight_scale", "input_scale", "k_scale"} and "k_scale" in SCALE_SUFFIXES
    )
    assert layout.unassigned == [
        "model.layers.0.mlp.router.bias",
        "model.layers.0.self_attn.k_scale",
        "weight",
    ]
    assert describe(layout.modules["model.layers.0.some_adapter"]) == (
        K.OTHER,
        0,
        None,
        None,
        None,
        None,
        [16, 64],
    )
    assert layout.modules["model.layers.0.mlp.experts.gate_proj.0"].kind is Kind.OTHER
    assert layout.modules["model.vision_model.blocks"].kind is Kind.VISION
    assert layout.modules["model.multi_modal_projector.linear_1"].kind is Kind.PROJECTOR
    assert (layout.architecture, layout.num_layers, layout.num_experts) == (None, 1, None)


def test_scale_suffixes_cover_every_scheme_tensor() -> None:
    from quantgate.validators.schemes import SCHEMES, WEIGHT_SUFFIXES

    assert WEIGHT_SUFFIXES == {s.weight_suffix for s in SCHEMES}    # weight, weight_packed, qweight, blocks
    assert {t.suffix for s in SCHEMES for t in s.tensors} - WEIGHT_SUFFIXES <= set(SCALE_SUFFIXES)


def synthetic_deepseek_v3_nvfp4(layers: int = 61, experts: int = 256) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of a DeepSeek-V3 NVFP4 export (~180k tensors)."""
    hidden, inter, moe_inter = 7168, 18432, 2048
    tensors: dict[str, TensorInfo] = {}

    def nvfp4(module: str, out: int, in_: int) -> None:
        for t in scheme(MODELOPT, "NVFP4").tensors:
            tensors[f"{module}.{t.suffix}"] = info(f"{module}.{t.suffix}", t.dtypes[0], *t.shape(out, in_))

    for n in range(layers):
        p = f"model.layers.{n}"
        for t in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"{p}.{t}.weight"] = info(f"{p}.{t}.weight", "BF16", hidden)
        for proj, out, in_ in (
            ("q_a_proj", 1536, hidden),
            ("q_b_proj", 24576, 1536),
            ("kv_a_proj_with_mqa", 576, hidden),
            ("kv_b_proj", 32768, 512),
            ("o_proj", hidden, 16384),
        ):
            nvfp4(f"{p}.self_attn.{proj}", out, in_)
        mlp = (
            ("gate_proj", moe_inter, hidden),
            ("up_proj", moe_inter, hidden),
            ("down_proj", hidden, moe_inter),
        )
        if n < 3:
            for proj, out, in_ in (
                ("gate_proj", inter, hidden),
                ("up_proj", inter, hidden),
                ("down_proj", hidden, inter),
            ):
                nvfp4(f"{p}.mlp.{proj}", out, in_)
            continue
        tensors[f"{p}.mlp.gate.weight"] = info(f"{p}.mlp.gate.weight", "BF16", experts, hidden)
        for proj, out, in_ in mlp:
            nvfp4(f"{p}.mlp.shared_experts.{proj}", out, in_)
            for e in range(experts):
                nvfp4(f"{p}.mlp.experts.{e}.{proj}", out, in_)
    return tensors


def test_layout_of_180k_tensors_is_fast() -> None:
    tensors = synthetic_deepseek_v3_nvfp4()
    config = {"architectures": ["DeepseekV3ForCausalLM"], "num_hidden_layers": 61, "n_routed_experts": 256}
    assert len(tensors) > 175_000
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        layout = build_layout(tensors, config)
        best = min(best, time.process_time() - start)
    assert len(layout.by_kind(Kind.EXPERT)) == 58 * 256 * 3
    # ~0.2 s measured on the 2-core CI box; the bound only catches accidental quadratic work
    assert best < 0.6, f"build_layout took {best:.3f} s CPU for {len(tensors)} tensors"


def test_absurd_fused_expert_counts_are_not_expanded() -> None:
    x = "model.layers.0.experts"
    layout = layout_from([info(f"{x}.gate_up_proj", "BF16", 10**9, 2, 16)])
    assert list(layout.modules) == [f"{x}.gate_up_proj"]
    assert layout.modules[f"{x}.gate_up_proj"].kind is Kind.OTHER
