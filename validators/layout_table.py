"""The name table behind `layout.build_layout`: how HF module names map to kinds, roles and groups.

Every architecture difference lives here as data. A module name is split at its decoder-layer
marker (`<prefix>.layers.<N>.`); the prefix decides the context (vision tower, projector, MTP
head), the part after it (the "tail") is matched against `TAIL_ROWS` in order, first match wins.
Names without a layer marker go through `GLOBAL_ROWS`. Regex groups:

- `blk`    the block path inside the layer (`self_attn`, `mlp.experts`, `feed_forward.shared_expert`)
- `proj`   the projection's own name (`q_proj`, `w1`, `gate_up_proj`) -> `ROLES` -> canonical role
- `expert` the expert index of per-expert tensors

Fused groups are `<layer>.<blk>[.<expert>].<FUSED_GROUPS[role]>`; the MoE group of a routed expert
is `<layer>.<blk>`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    """What a module is. Values are the lowercase words used in reports and JSON."""

    ATTENTION = "attention"
    MLP = "mlp"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    ROUTER = "router"
    LM_HEAD = "lm_head"
    EMBEDDING = "embedding"
    VISION = "vision"
    PROJECTOR = "projector"
    NORM = "norm"
    OTHER = "other"


@dataclass(frozen=True)
class TailRow:
    """One name template for modules inside a decoder layer."""

    pattern: str  # regex, full-matched against the tail after "<prefix>.layers.<N>."
    kind: Kind
    fused_experts: bool = False  # a 3-D tensor holding every expert: expand to virtual modules
    note: str = ""


@dataclass(frozen=True)
class GlobalRow:
    """One name template for modules outside the decoder layers (matched on the last component)."""

    pattern: str  # regex, full-matched against the module's last name component
    kind: Kind
    role: str | None


@dataclass(frozen=True)
class FusedExpertFormat:
    """How a model type stores fused 3-D expert tensors."""

    transposed: bool  # [E, in, out] (x @ W) instead of nn.Linear's [E, out, in]
    interleaved: bool  # gate/up alternate along the out dim (gate = 0::2, up = 1::2)


_MLP_PROJ = r"gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3"
_EXPERTS = r"(?P<blk>(?:[\w.]+\.)?experts)"

TAIL_ROWS: tuple[TailRow, ...] = (
    TailRow(rf"{_EXPERTS}\.(?P<expert>\d+)\.(?P<proj>{_MLP_PROJ})", Kind.EXPERT,
            note="per-expert 2-D: Qwen/DeepSeek mlp.experts.{e}.gate_proj, Mixtral "
                 "block_sparse_moe.experts.{e}.w1, Gemma4 quantized exports layers.N.experts.{e}.gate_proj"),
    TailRow(rf"{_EXPERTS}\.(?P<proj>gate_up_proj|down_proj|up_proj)", Kind.EXPERT, fused_experts=True,
            note="fused 3-D: Gemma4 experts.gate_up_proj [E,2I,H], GPT-OSS/Llama4 transposed [E,H,2I]"),
    TailRow(rf"(?P<blk>(?:[\w.]+\.)?(?:shared_experts?|shared_mlp))\.(?P<proj>{_MLP_PROJ})",
            Kind.SHARED_EXPERT,
            note="Qwen mlp.shared_expert, DeepSeek mlp.shared_experts, Llama4 feed_forward.shared_expert"),
    TailRow(r"(?:(?P<blk>mlp|block_sparse_moe|feed_forward|moe)\.)?(?P<proj>shared_expert_gate)", Kind.ROUTER,
            note="Qwen2/3.5-MoE shared_expert_gate [1,H]"),
    TailRow(r"(?:(?P<blk>mlp|block_sparse_moe|feed_forward|moe)\.)?(?P<proj>gate|router)(?:\.proj|\.layer)?",
            Kind.ROUTER,
            note="mlp.gate, block_sparse_moe.gate, mlp.router, feed_forward.router, Gemma4 router.proj"),
    TailRow(rf"(?P<blk>mlp|feed_forward|ffn)\.(?P<proj>{_MLP_PROJ}|fc1|fc2|dense_h_to_4h|dense_4h_to_h)"
            r"(?:\.linear)?",
            Kind.MLP, note="dense MLP (also DeepSeek's first dense layers, Gemma4's parallel dense mlp); "
                           "`.linear`: Gemma4 vision clippable linears"),
    TailRow(r"(?P<blk>self_attn|self_attention|attention|attn|cross_attn)\.(?P<proj>q_proj|k_proj|v_proj|"
            r"o_proj|qkv_proj|out_proj|dense|query_key_value|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj)"
            r"(?:\.linear)?",
            Kind.ATTENTION, note="MHA/GQA and DeepSeek MLA projections"),
    TailRow(r"(?P<blk>linear_attn)\.(?P<proj>in_proj_qkvz|in_proj_qkv|in_proj_z|in_proj_ba|in_proj_a|"
            r"in_proj_b|out_proj|conv1d)", Kind.ATTENTION,
            note="Qwen3-Next / Qwen3.5 gated-delta linear attention"),
    TailRow(r"(?P<proj>per_layer_input_gate|per_layer_projection)", Kind.OTHER,
            note="Gemma per-layer-embedding (PLE) projections"),
    TailRow(r"(?P<proj>eh_proj|shared_head\.head)", Kind.OTHER, note="DeepSeek MTP layer parts"),
)

GLOBAL_ROWS: tuple[GlobalRow, ...] = (
    GlobalRow(r"lm_head|embed_out", Kind.LM_HEAD, "lm_head"),
    GlobalRow(r"embed_tokens|embed_tokens_per_layer|wte|wpe|word_embeddings|tok_embeddings|embed_positions|"
              r"position_embeddings", Kind.EMBEDDING, "embedding"),
    GlobalRow(r"per_layer_model_projection", Kind.OTHER, "ple_proj"),
)

# Canonical roles: the projection's job, independent of what a family calls it.
ROLES: dict[str, str] = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "qkv_proj": "qkv", "query_key_value": "qkv",
    "out_proj": "o", "dense": "o",
    "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down", "gate_up_proj": "gate_up",
    "w1": "gate", "w3": "up", "w2": "down",  # Mixtral: w1 = gate, w3 = up, w2 = down
    "fc1": "up", "fc2": "down", "dense_h_to_4h": "up", "dense_4h_to_h": "down",
    "in_proj_qkvz": "in_qkvz", "in_proj_qkv": "in_qkv", "in_proj_z": "in_z",
    "in_proj_ba": "in_ba", "in_proj_a": "in_a", "in_proj_b": "in_b", "conv1d": "conv",
    "gate": "router", "router": "router", "shared_expert_gate": "shared_expert_gate",
    "per_layer_input_gate": "ple_gate", "per_layer_projection": "ple_proj",
    "eh_proj": "mtp", "shared_head.head": "mtp",
}

# Roles engines load into one fused parameter -> the group's last name component.
FUSED_GROUPS: dict[str, str] = {
    "q": "qkv", "k": "qkv", "v": "qkv", "qkv": "qkv",
    "gate": "gate_up", "up": "gate_up", "gate_up": "gate_up",
    "q_a": "fused_qkv_a", "kv_a": "fused_qkv_a",  # DeepSeek MLA (vLLM fused_qkv_a_proj)
    "in_qkv": "in_proj_qkvz", "in_z": "in_proj_qkvz", "in_qkvz": "in_proj_qkvz",
    "in_a": "in_proj_ba", "in_b": "in_proj_ba", "in_ba": "in_proj_ba",
}

# Prefix markers (any dotted component of the part before the layer marker, or of a layer-less name).
PROJECTOR_MARKERS = ("multi_modal_projector", "mm_projector", "embed_vision", "embed_audio",
                     "audio_projector")
VISION_MARKERS = ("vision_tower", "vision_model", "visual", "vision_encoder", "image_encoder",
                  "audio_tower", "audio_model", "audio_encoder", "speech_encoder")
MTP_MARKERS = ("mtp",)
MTP_ROLE = "mtp"

# Decoder-layer containers: "<prefix>.layers.<N>." (also GPT-2 style "h" and "blocks").
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
CONTEXT_RE = re.compile(
    r"(?:^|\.)(?:(?P<projector>{})|(?P<vision>{})|(?P<mtp>{}))(?:\.|$)".format(
        "|".join(PROJECTOR_MARKERS), "|".join(VISION_MARKERS), "|".join(MTP_MARKERS)))
CONTEXT_KINDS: dict[str, Kind] = {"projector": Kind.PROJECTOR, "vision": Kind.VISION, "mtp": Kind.OTHER}
NORM_RE = re.compile(r".*norm.*|ln(?:_\w+|\d*)")  # last component of a norm's name

# Fused 3-D expert tensors keep the expert projection in the tensor's own last component:
# "experts.gate_up_proj", "experts.gate_up_proj_bias", ModelOpt "experts.gate_up_proj_weight_scale".
FUSED_TENSOR_RE = re.compile(r"(?P<proj>gate_up_proj|down_proj|up_proj)(?:_(?P<rest>\w+))?")

# model_type -> fused expert storage; anything else is inferred from shapes (default [E, out, in]).
FUSED_EXPERT_FORMATS: dict[str, FusedExpertFormat] = {
    "gpt_oss": FusedExpertFormat(transposed=True, interleaved=True),
    "llama4": FusedExpertFormat(transposed=True, interleaved=False),
    "llama4_text": FusedExpertFormat(transposed=True, interleaved=False),
}

@dataclass(frozen=True)
class FusedWeight:
    """A tensor that carries the weights of every expert of a fused MoE module."""

    suffix: str  # the module suffix ("weight" for `experts.gate_up_proj`, "blocks" for `..._blocks`)
    ndim: int  # dims with the leading expert dim
    scheme: str | None  # "dialect:NAME" whose per-expert logical shape applies; None: [E, out, in]
    transposed: bool | None  # stored orientation; None: from FUSED_EXPERT_FORMATS or the shapes


# First match wins. GPT-OSS MXFP4 `experts.gate_up_proj_blocks` [E, 2I, H/32, 16] is stored out-major
# (not transposed like its BF16 form) with gate/up rows still interleaved (formats_beyond_two.md §3).
FUSED_WEIGHTS: tuple[FusedWeight, ...] = (
    FusedWeight("weight", 3, None, None),
    FusedWeight("blocks", 4, "mxfp4:MXFP4", False),
)

# A fused 3-D tensor claiming more experts than this is not expanded (a hostile header must not make
# the layout allocate billions of virtual modules); the largest real MoEs have a few hundred experts.
MAX_FUSED_EXPERTS = 4096

# Config keys, in lookup order (top level first, then text_config for multimodal wrappers).
NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")

COMPILED_TAIL_ROWS: tuple[tuple[re.Pattern[str], TailRow], ...] = tuple(
    (re.compile(row.pattern), row) for row in TAIL_ROWS)
COMPILED_GLOBAL_ROWS: tuple[tuple[re.Pattern[str], GlobalRow], ...] = tuple(
    (re.compile(row.pattern), row) for row in GLOBAL_ROWS)
