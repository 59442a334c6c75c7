"""Expected layouts of the tiny models (exporter.tiny_models defaults) and helpers the layout tests share.

Imported as a top-level module by the layout tests (pytest puts this directory on sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantgate.validators.layout import Kind, Layout, Module, build_layout
from quantgate.validators.safetensors_header import TensorInfo, read_header

# tiny model sizes: hidden, FFN / expert intermediate, experts, layers
H, F, E, L = 64, 128, 8, 2
K = Kind


def read_checkpoint(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """Every tensor header of a checkpoint dir (all shards) and its config.json."""
    tensors: dict[str, TensorInfo] = {}
    for shard in sorted(path.glob("*.safetensors")):
        tensors.update(read_header(shard).tensors)
    return tensors, json.loads((path / "config.json").read_text())


def layout_of(path: Path) -> Layout:
    return build_layout(*read_checkpoint(path))


def describe(m: Module) -> tuple:
    """The attributes the expectations pin: (kind, layer, expert, role, fused_group, moe_group, [out, in])."""
    return (m.kind, m.layer, m.expert, m.role, m.fused_group, m.moe_group, [m.out_features, m.in_features])


# Per architecture: modules per kind, tensors that belong to no module, and sample modules as
# name -> (kind, layer, expert, role, fused_group, moe_group, [out, in]).
EXPECTED: dict[str, dict] = {
    "gemma4": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: L * 4,
            K.MLP: L * 3,
            K.ROUTER: L,
            K.EMBEDDING: 1,
            K.NORM: L * 9 + 1,
        },
        unassigned={
            f"model.layers.{n}.{t}"
            for n in range(L)
            for t in ("layer_scalar", "router.scale", "router.per_expert_scale")
        },
        modules={
            "model.layers.1.router.proj": (K.ROUTER, 1, None, "router", None, None, [E, H]),
            "model.layers.0.mlp.gate_proj": (
                K.MLP,
                0,
                None,
                "gate",
                "model.layers.0.mlp.gate_up",
                None,
                [F, H],
            ),
            "model.layers.0.experts.7.down_proj": (
                K.EXPERT,
                0,
                7,
                "down",
                None,
                "model.layers.0.experts",
                [H, F],
            ),
            "model.layers.1.experts.2.up_proj": (
                K.EXPERT,
                1,
                2,
                "up",
                "model.layers.1.experts.2.gate_up",
                "model.layers.1.experts",
                [F, H],
            ),
            "model.layers.1.self_attn.v_proj": (
                K.ATTENTION,
                1,
                None,
                "v",
                "model.layers.1.self_attn.qkv",
                None,
                [32, H],
            ),
            "model.layers.0.self_attn.q_norm": (K.NORM, 0, None, None, None, None, [16, None]),
            "model.embed_tokens": (K.EMBEDDING, None, None, "embedding", None, None, [1000, H]),
        },
    ),
    "gemma4_mm": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: L * 4,
            K.MLP: L * 3,
            K.ROUTER: L,
            K.EMBEDDING: 1,
            K.NORM: L * 9 + 1,
            K.VISION: 14,
            K.PROJECTOR: 1,
        },
        unassigned={
            f"model.language_model.layers.{n}.{t}"
            for n in range(L)
            for t in ("layer_scalar", "router.scale", "router.per_expert_scale")
        }
        | {"model.vision_tower.patch_embedder.position_embedding_table"},
        modules={
            "model.language_model.layers.0.experts.3.gate_proj": (
                K.EXPERT,
                0,
                3,
                "gate",
                "model.language_model.layers.0.experts.3.gate_up",
                "model.language_model.layers.0.experts",
                [F, H],
            ),
            "model.language_model.layers.1.router.proj": (K.ROUTER, 1, None, "router", None, None, [E, H]),
            "model.vision_tower.encoder.layers.0.self_attn.q_proj.linear": (
                K.VISION,
                None,
                None,
                "q",
                "model.vision_tower.encoder.layers.0.self_attn.qkv",
                None,
                [64, 64],
            ),
            "model.vision_tower.patch_embedder.input_proj": (
                K.VISION,
                None,
                None,
                None,
                None,
                None,
                [64, 768],
            ),
            "model.embed_vision.embedding_projection": (K.PROJECTOR, None, None, None, None, None, [H, 64]),
            "model.language_model.embed_tokens": (
                K.EMBEDDING,
                None,
                None,
                "embedding",
                None,
                None,
                [1000, H],
            ),
        },
    ),
    "qwen3_moe": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: L * 4,
            K.ROUTER: L,
            K.NORM: L * 4 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned=set(),
        modules={
            "model.layers.1.mlp.gate": (K.ROUTER, 1, None, "router", None, None, [E, H]),
            "model.layers.1.mlp.experts.5.gate_proj": (
                K.EXPERT,
                1,
                5,
                "gate",
                "model.layers.1.mlp.experts.5.gate_up",
                "model.layers.1.mlp.experts",
                [F, H],
            ),
            "lm_head": (K.LM_HEAD, None, None, "lm_head", None, None, [1000, H]),
        },
    ),
    "qwen3_5_moe": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: 6 + 4,
            K.SHARED_EXPERT: L * 3,
            K.ROUTER: L * 2,
            K.NORM: 3 + 4 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned={"model.layers.0.linear_attn.A_log", "model.layers.0.linear_attn.dt_bias"},
        modules={
            "model.layers.0.linear_attn.in_proj_qkv": (
                K.ATTENTION,
                0,
                None,
                "in_qkv",
                "model.layers.0.linear_attn.in_proj_qkvz",
                None,
                [128, H],
            ),
            "model.layers.0.linear_attn.in_proj_z": (
                K.ATTENTION,
                0,
                None,
                "in_z",
                "model.layers.0.linear_attn.in_proj_qkvz",
                None,
                [64, H],
            ),
            "model.layers.0.linear_attn.in_proj_b": (
                K.ATTENTION,
                0,
                None,
                "in_b",
                "model.layers.0.linear_attn.in_proj_ba",
                None,
                [4, H],
            ),
            "model.layers.0.linear_attn.out_proj": (K.ATTENTION, 0, None, "o", None, None, [H, 64]),
            "model.layers.0.linear_attn.conv1d": (K.ATTENTION, 0, None, "conv", None, None, [128, 4]),
            "model.layers.1.self_attn.q_proj": (
                K.ATTENTION,
                1,
                None,
                "q",
                "model.layers.1.self_attn.qkv",
                None,
                [128, H],
            ),  # gated attention: q carries the gate
            "model.layers.1.mlp.shared_expert.up_proj": (
                K.SHARED_EXPERT,
                1,
                None,
                "up",
                "model.layers.1.mlp.shared_expert.gate_up",
                None,
                [F, H],
            ),
            "model.layers.1.mlp.shared_expert_gate": (
                K.ROUTER,
                1,
                None,
                "shared_expert_gate",
                None,
                None,
                [1, H],
            ),
        },
    ),
    "mixtral": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: L * 4,
            K.ROUTER: L,
            K.NORM: L * 2 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned=set(),
        modules={
            "model.layers.0.block_sparse_moe.experts.4.w1": (
                K.EXPERT,
                0,
                4,
                "gate",
                "model.layers.0.block_sparse_moe.experts.4.gate_up",
                "model.layers.0.block_sparse_moe.experts",
                [F, H],
            ),
            "model.layers.0.block_sparse_moe.experts.4.w3": (
                K.EXPERT,
                0,
                4,
                "up",
                "model.layers.0.block_sparse_moe.experts.4.gate_up",
                "model.layers.0.block_sparse_moe.experts",
                [F, H],
            ),
            "model.layers.0.block_sparse_moe.experts.4.w2": (
                K.EXPERT,
                0,
                4,
                "down",
                None,
                "model.layers.0.block_sparse_moe.experts",
                [H, F],
            ),
            "model.layers.1.block_sparse_moe.gate": (K.ROUTER, 1, None, "router", None, None, [E, H]),
        },
    ),
    "deepseek_v3": dict(
        kinds={
            K.MLP: 3,
            K.EXPERT: E * 3,
            K.SHARED_EXPERT: 3,
            K.ROUTER: 1,
            K.ATTENTION: L * 5,
            K.NORM: L * 4 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned={"model.layers.1.mlp.gate.e_score_correction_bias"},
        modules={
            "model.layers.0.mlp.down_proj": (K.MLP, 0, None, "down", None, None, [H, 256]),
            "model.layers.1.self_attn.q_a_proj": (
                K.ATTENTION,
                1,
                None,
                "q_a",
                "model.layers.1.self_attn.fused_qkv_a",
                None,
                [48, H],
            ),
            "model.layers.1.self_attn.kv_a_proj_with_mqa": (
                K.ATTENTION,
                1,
                None,
                "kv_a",
                "model.layers.1.self_attn.fused_qkv_a",
                None,
                [40, H],
            ),
            "model.layers.1.self_attn.kv_b_proj": (K.ATTENTION, 1, None, "kv_b", None, None, [128, 32]),
            "model.layers.1.mlp.shared_experts.gate_proj": (
                K.SHARED_EXPERT,
                1,
                None,
                "gate",
                "model.layers.1.mlp.shared_experts.gate_up",
                None,
                [F, H],
            ),
            "model.layers.1.mlp.gate": (K.ROUTER, 1, None, "router", None, None, [E, H]),
            "model.layers.1.mlp.experts.0.down_proj": (
                K.EXPERT,
                1,
                0,
                "down",
                None,
                "model.layers.1.mlp.experts",
                [H, F],
            ),
        },
    ),
    "gpt_oss": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.ATTENTION: L * 4,
            K.ROUTER: L,
            K.NORM: L * 2 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned={f"model.layers.{n}.self_attn.sinks" for n in range(L)},
        modules={
            "model.layers.1.mlp.router": (K.ROUTER, 1, None, "router", None, None, [E, H]),
            "model.layers.1.mlp.experts.6.up_proj": (
                K.EXPERT,
                1,
                6,
                "up",
                "model.layers.1.mlp.experts.6.gate_up",
                "model.layers.1.mlp.experts",
                [F, H],
            ),
            "model.layers.1.mlp.experts.6.down_proj": (
                K.EXPERT,
                1,
                6,
                "down",
                None,
                "model.layers.1.mlp.experts",
                [H, F],
            ),
        },
    ),
    "llama4": dict(
        kinds={
            K.EXPERT: L * E * 3,
            K.SHARED_EXPERT: L * 3,
            K.ATTENTION: L * 4,
            K.ROUTER: L,
            K.NORM: L * 2 + 1,
            K.EMBEDDING: 1,
            K.LM_HEAD: 1,
        },
        unassigned=set(),
        modules={
            "model.layers.0.feed_forward.router": (K.ROUTER, 0, None, "router", None, None, [E, H]),
            "model.layers.0.feed_forward.experts.1.gate_proj": (
                K.EXPERT,
                0,
                1,
                "gate",
                "model.layers.0.feed_forward.experts.1.gate_up",
                "model.layers.0.feed_forward.experts",
                [F, H],
            ),
            "model.layers.0.feed_forward.shared_expert.down_proj": (
                K.SHARED_EXPERT,
                0,
                None,
                "down",
                None,
                None,
                [H, F],
            ),
        },
    ),
    "llama": dict(
        kinds={K.ATTENTION: L * 4, K.MLP: L * 3, K.NORM: L * 2 + 1, K.EMBEDDING: 1, K.LM_HEAD: 1},
        unassigned=set(),
        modules={
            "model.layers.1.self_attn.o_proj": (K.ATTENTION, 1, None, "o", None, None, [H, H]),
            "model.layers.1.mlp.up_proj": (K.MLP, 1, None, "up", "model.layers.1.mlp.gate_up", None, [F, H]),
        },
    ),
}
