"""How vLLM and SGLang name modules and decide that a module is excluded from quantization.

Everything here reproduces reference vllm_sglang.md §2 (vLLM ModelOpt `is_layer_excluded`), §5
(compressed-tensors `should_ignore_layer`) and §8 (SGLang regex per segment). Architecture
differences are data: `ARCH_NAMING` maps an architecture to the prefix renames the model's
`hf_to_vllm_mapper` applies (to names AND exclude patterns), the renames done inside the model's own
weight iterator (to names only: Gemma4 `experts` -> `moe.experts`, invariant 10) and its
`packed_modules_mapping` (fused shards).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Protocol

#: vLLM's ModelOpt `get_quant_method` forces these unquantized whatever the exclude list says (invariant 12).
VISION_MARKERS: tuple[str, ...] = ("vision_tower", "vision_model", "visual")

#: The `packed_modules_mapping` most decoder models declare (fused name -> shard names).
DEFAULT_PACKED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
#: SGLang's MLA fused tails: a pattern hits when it is a substring of the last segment (§8).
SGLANG_MLA_TAILS: tuple[str, ...] = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


@dataclass(frozen=True)
class ArchNaming:
    """One architecture's module naming inside the engines.

    `prefix_map`: the model's `hf_to_vllm_mapper` `orig_to_new_prefix`, applied to module names and,
    in vLLM, to exclude patterns. `internal`: regex renames applied by the model's weight iterator to
    names only, never to patterns. `packed`: fused module -> shard names. `unquantized_roles`:
    layout roles the model builds with `quant_config=None` (never quantized, never excluded).
    `sglang_maps_patterns`: whether SGLang's `apply_weight_name_mapper` rewrites the patterns too
    (False reproduces models whose mapper missed nested `model.language_model.`, sglang PR #38781).
    """

    prefix_map: tuple[tuple[str, str], ...] = ()
    internal: tuple[tuple[str, str], ...] = ()
    packed: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_PACKED))
    unquantized_roles: frozenset[str] = frozenset()
    sglang_maps_patterns: bool = True
    note: str = ""


_GEMMA4_INTERNAL = ((r"(?<!\.moe)\.experts(?=\.\d|\.gate_up_proj$|\.down_proj$|$)", ".moe.experts"),)
_GEMMA_MM_PREFIX = (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                    ("model.embed_vision.", "embed_vision."), ("model.multi_modal_projector.",
                                                                "multi_modal_projector."),
                    ("lm_head.", "language_model.lm_head."))
_DEEPSEEK_PACKED = {**DEFAULT_PACKED, "fused_qkv_a_proj": ("q_a_proj", "kv_a_proj_with_mqa")}

ARCH_NAMING: dict[str, ArchNaming] = {
    "Gemma4ForCausalLM": ArchNaming(
        internal=_GEMMA4_INTERNAL, unquantized_roles=frozenset({"router"}),
        note="gemma4.py _weight_iterator renames experts -> moe.experts; router.proj is a GateLinear "
             "built without quant_config (§4.5)"),
    "Gemma4ForConditionalGeneration": ArchNaming(
        prefix_map=_GEMMA_MM_PREFIX, internal=_GEMMA4_INTERNAL, unquantized_roles=frozenset({"router"}),
        note="multimodal wrapper: model.language_model. -> language_model.model. (names and patterns)"),
    "DeepseekV3ForCausalLM": ArchNaming(packed=_DEEPSEEK_PACKED, unquantized_roles=frozenset({"router"}),
                                        note="deepseek_v2.py: the router (mlp.gate) is built without a quant config"),
    "DeepseekV2ForCausalLM": ArchNaming(packed=_DEEPSEEK_PACKED, unquantized_roles=frozenset({"router"}),
                                        note="deepseek_v2.py: the router (mlp.gate) is built without a quant config"),
    "Qwen3_5MoeForConditionalGeneration": ArchNaming(
        prefix_map=(("model.language_model.", "language_model.model."), ("model.visual.", "visual."),
                    ("lm_head.", "language_model.lm_head."))),
    "Llama4ForConditionalGeneration": ArchNaming(
        prefix_map=(("model.language_model.", "language_model.model."), ("model.vision_model.", "vision_model."),
                    ("model.multi_modal_projector.", "multi_modal_projector."),
                    ("lm_head.", "language_model.lm_head."))),
}
#: model_type aliases, for configs whose `architectures` is missing.
MODEL_TYPE_ARCH: dict[str, str] = {
    "gemma4": "Gemma4ForConditionalGeneration", "gemma4_text": "Gemma4ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration", "llama4": "Llama4ForConditionalGeneration",
}
DEFAULT_NAMING = ArchNaming()


def naming_for(architecture: str | None) -> ArchNaming:
    if architecture is None:
        return DEFAULT_NAMING
    return ARCH_NAMING.get(architecture) or ARCH_NAMING.get(MODEL_TYPE_ARCH.get(architecture, ""), DEFAULT_NAMING)


def _apply_prefix_map(name: str, prefix_map: tuple[tuple[str, str], ...]) -> str:
    for old, new in prefix_map:        # WeightsMapper: first matching prefix wins
        if name.startswith(old):
            return new + name[len(old):]
        if name + "." == old:          # a bare module equal to the mapped prefix
            return new[:-1]
    return name


@lru_cache(maxsize=None)
def _compiled_internal(internal: tuple[tuple[str, str], ...]) -> tuple[tuple[re.Pattern[str], str], ...]:
    return tuple((re.compile(pat), rep) for pat, rep in internal)


_EXPERT_RE = re.compile(r"^(?P<moe>.*\.experts)\.\d+\.[^.]+$")


def packed_name(module: str, naming: ArchNaming) -> tuple[str, tuple[str, ...]] | None:
    """`...self_attn.q_proj` -> (`...self_attn.qkv_proj`, shard names), or None for unfused modules."""
    head, _, last = module.rpartition(".")
    for fused, shards in naming.packed.items():
        if last in shards:
            base = f"{head}." if head else ""
            return base + fused, tuple(base + s for s in shards)
    return None


def fused_shards(prefix: str, naming: ArchNaming) -> tuple[str, ...] | None:
    """`...qkv_proj` -> (`...q_proj`, `...k_proj`, `...v_proj`); None when `prefix` is not a fused name."""
    head, _, last = prefix.rpartition(".")
    shards = naming.packed.get(last)
    if shards is None:
        return None
    base = f"{head}." if head else ""
    return tuple(base + s for s in shards)


def engine_unit(prefix: str, naming: ArchNaming) -> str:
    """The engine layer that owns an (engine-named) module: a routed expert's projection belongs to
    its FusedMoE layer (`...mlp.experts`), a q/k/v or gate/up shard to its fused linear."""
    m = _EXPERT_RE.match(prefix)
    if m:
        return m.group("moe")
    packed = packed_name(prefix, naming)
    return packed[0] if packed else prefix


@dataclass(frozen=True)
class ExclusionHit:
    """Why an engine treats a prefix as excluded; `how` is exact|expert|substring|fnmatch|regex|segment."""

    pattern: str
    how: str


class FusedShardConflict(Exception):
    """vLLM/SGLang raise ValueError when only some shards of a fused module are listed."""

    def __init__(self, prefix: str, listed: tuple[str, ...], unlisted: tuple[str, ...]) -> None:
        self.prefix, self.listed, self.unlisted = prefix, listed, unlisted
        super().__init__(f"Detected some but not all shards of {prefix} are quantized. All shards of fused "
                         "layers to have the same precision.")


class EngineSemantics(Protocol):
    name: str

    def engine_name(self, module: str, architecture: str | None) -> str: ...

    def is_excluded(self, module: str, patterns: Sequence[str], architecture: str | None) -> bool: ...


def _split_star(patterns: Sequence[str]) -> list[str]:
    """vLLM `apply_vllm_mapper`: `x*` (not `x.*`) becomes `x` and `x.*` before mapping (vllm#28072)."""
    out: list[str] = []
    for p in patterns:
        if p.endswith("*") and not p.endswith(".*") and len(p) > 1:
            out.extend((p[:-1], p[:-1] + ".*"))
        else:
            out.append(p)
    return out


class _Base:
    name = ""

    def engine_name(self, module: str, architecture: str | None) -> str:
        """HF module name -> the engine's module prefix (mapper first, then the model-internal renames)."""
        naming = naming_for(architecture)
        name = _apply_prefix_map(module, naming.prefix_map)
        for regex, rep in _compiled_internal(naming.internal):
            name = regex.sub(rep, name)
        return name

    def engine_patterns(self, patterns: Sequence[str], architecture: str | None) -> tuple[str, ...]:
        raise NotImplementedError

    def match(self, prefix: str, patterns: tuple[str, ...], architecture: str | None) -> ExclusionHit | None:
        raise NotImplementedError

    def is_excluded(self, module: str, patterns: Sequence[str], architecture: str | None) -> bool:
        """Is the HF `module` excluded in this engine? Fused shards are resolved via their fused prefix."""
        unit = engine_unit(self.engine_name(module, architecture), naming_for(architecture))
        try:
            return self.match(unit, self.engine_patterns(patterns, architecture), architecture) is not None
        except FusedShardConflict:   # the engine raises; report the shard's own exact status
            return self.engine_name(module, architecture) in set(self.engine_patterns(patterns, architecture))

    @staticmethod
    def _exact(prefix: str, patterns: tuple[str, ...], naming: ArchNaming) -> ExclusionHit | None:
        """`quant_utils.is_layer_skipped`: fused shards by exact membership, experts by substring."""
        listed = set(patterns)
        shards = fused_shards(prefix, naming)
        if shards is not None:
            hit = tuple(s for s in shards if s in listed)
            if hit and len(hit) != len(shards):
                raise FusedShardConflict(prefix, hit, tuple(s for s in shards if s not in listed))
            return ExclusionHit(hit[0], "exact") if hit else None
        if "experts" in prefix:
            for p in patterns:
                if "experts" in p and prefix in p:
                    return ExclusionHit(p, "expert")
            return None
        return ExclusionHit(prefix, "exact") if prefix in listed else None


#: Both engines also try a name without the multimodal wrapper's `language_model.` prefix.
WRAPPER_PREFIX = "language_model."


class VllmSemantics(_Base):
    """vLLM `ModelOptQuantConfigBase.is_layer_excluded` (exact / substring / fnmatch), §2."""

    name = "vllm"

    def engine_patterns(self, patterns: Sequence[str], architecture: str | None) -> tuple[str, ...]:
        return _vllm_patterns(tuple(patterns), architecture)

    def match(self, prefix: str, patterns: tuple[str, ...], architecture: str | None) -> ExclusionHit | None:
        naming = naming_for(architecture)
        hit = self._exact(prefix, patterns, naming)
        if hit:
            return hit
        stripped = prefix.removeprefix(WRAPPER_PREFIX)
        for p in patterns:
            if p and (p in prefix or p in stripped):
                return ExclusionHit(p, "substring")
        for p in patterns:
            if fnmatch.fnmatchcase(prefix, p):
                return ExclusionHit(p, "fnmatch")
        return None


@lru_cache(maxsize=256)
def _vllm_patterns(patterns: tuple[str, ...], architecture: str | None) -> tuple[str, ...]:
    naming = naming_for(architecture)
    return tuple(_apply_prefix_map(p, naming.prefix_map) for p in _split_star(patterns))


@lru_cache(maxsize=4096)
def _sglang_regex(pattern: str) -> re.Pattern[str]:
    return re.compile(re.escape(pattern).replace(r"\*", ".*"))


class SglangSemantics(_Base):
    """SGLang `ModelOptQuantConfig`: exact + fused shards, then each pattern as a regex (`*` -> `.*`)
    full-matched against the prefix, the prefix minus `language_model.`, and every dotted segment; plus
    MLA fused tails. No plain-substring rule (§8)."""

    name = "sglang"

    def engine_patterns(self, patterns: Sequence[str], architecture: str | None) -> tuple[str, ...]:
        return _sglang_patterns(tuple(patterns), architecture)

    def match(self, prefix: str, patterns: tuple[str, ...], architecture: str | None) -> ExclusionHit | None:
        naming = naming_for(architecture)
        hit = self._exact(prefix, patterns, naming)
        if hit:
            return hit
        stripped = prefix.removeprefix(WRAPPER_PREFIX)
        segments = prefix.split(".")
        last = segments[-1]
        for p in patterns:
            regex = _sglang_regex(p)
            if regex.fullmatch(prefix) or regex.fullmatch(stripped):
                return ExclusionHit(p, "regex")
            if any(regex.fullmatch(seg) for seg in segments):
                return ExclusionHit(p, "segment")
            if last in SGLANG_MLA_TAILS and p.rpartition(".")[2] in SGLANG_MLA_TAILS and p in prefix:
                return ExclusionHit(p, "mla")
        return None


def _map_star_pattern(pattern: str, prefix_map: tuple[tuple[str, str], ...]) -> str:
    """Prefix-map a pattern; `model.vision_tower*` maps like `model.vision_tower.` (the dot-less
    wildcard ModelOpt writes), since SGLang's mapper rewrites the pattern's literal prefix."""
    mapped = _apply_prefix_map(pattern, prefix_map)
    if mapped == pattern and pattern.endswith("*") and not pattern.endswith(".*"):
        stem = pattern[:-1]
        for old, new in prefix_map:
            if old == stem + ".":
                return new[:-1] + "*"
    return mapped


@lru_cache(maxsize=256)
def _sglang_patterns(patterns: tuple[str, ...], architecture: str | None) -> tuple[str, ...]:
    naming = naming_for(architecture)
    out: list[str] = []
    for p in patterns:
        mapped = _map_star_pattern(p, naming.prefix_map) if naming.sglang_maps_patterns else p
        out.append(mapped)
        if mapped.startswith("language_model."):
            out.append(mapped[len("language_model."):])
    return tuple(dict.fromkeys(out))


def ct_match(name: str, pattern: str) -> bool:
    """compressed-tensors `check_equal_or_regex_match`: exact, or `re:` with `re.match` (start-anchored)."""
    if pattern.startswith("re:"):
        try:
            return re.match(pattern[3:], name) is not None
        except re.error:
            return False
    return name == pattern


def ct_is_ignored(prefix: str, ignore: Sequence[str], naming: ArchNaming) -> bool:
    """CT `should_ignore_layer`: fused names are expanded to their shards, which must agree (§5)."""
    names = fused_shards(prefix, naming) or (prefix,)
    flags = [any(ct_match(n, p) for p in ignore) for n in names]
    if any(flags) and not all(flags):
        raise FusedShardConflict(prefix, tuple(n for n, f in zip(names, flags) if f),
                                 tuple(n for n, f in zip(names, flags) if not f))
    return bool(flags and flags[0])


ENGINE_SEMANTICS: dict[str, VllmSemantics | SglangSemantics] = {
    "vllm": VllmSemantics(),
    "sglang": SglangSemantics(),
}


def is_vision(prefix: str) -> bool:
    return any(marker in prefix for marker in VISION_MARKERS)
