"""Native `fp8` exclusion semantics of vLLM and SGLang, per engine version, and what a mismatch does.

Sources (reference formats_beyond_two.md §2, §7, §8; vllm_sglang.md §7):
- vLLM `quantization/fp8.py::Fp8Config.get_quant_method` + `utils/quant_utils.py::is_layer_skipped`
  (default `skip_with_substr=False`, read at 1436674b, late 2025): the list goes through the model's
  `hf_to_vllm_mapper`; fused layers are tested shard by shard (exact membership; shards that
  disagree raise ValueError); a prefix containing "experts" is skipped when it is a *substring* of an
  ignore entry that itself contains "experts" (one per-expert entry excludes the whole FusedMoE);
  anything else needs an exact entry. No wildcards.
- SGLang `layers/quantization/utils.py::is_layer_skipped`: up to v0.5.10 a plain substring test
  (`any(ignored in prefix ...)`; HF fp8 configs carry no packed mapping, so `mlp.gate` also excluded
  the fused `mlp.gate_up_proj`: sglang #23687); from v0.5.11 (PR #23467, `_module_path_match`)
  dot-boundary matching: equal, a dotted ancestor, or a whole-segment run of the prefix, with fused
  shards (`_FALLBACK_FUSED_SHARDS`). Both keep the experts rule (a FusedMoE prefix inside an entry
  naming experts). Read from the PR diff and a fork copy; SGLang's FusedMoE dispatch [unsure].

`fp8_exclusion(engine, prefix, patterns, naming, version)` is the matcher; `version` is an engine
release such as "0.5.10" or (0, 5, 10); None means the newest. The per-release matching is a row of
the engine facts table (`FP8_SKIP_MATCHING`, validators/engine_facts.py), picked by `--engine-version`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from quantgate.validators import engine_facts
from quantgate.validators.engine_facts import FP8_SKIP_MATCHING, Fact
from quantgate.validators.engines import (
    ArchNaming,
    ExclusionHit,
    FusedShardConflict,
    VllmSemantics,
    _apply_prefix_map,
    fused_shards,
    packed_name,
)

if TYPE_CHECKING:
    from quantgate.validators.layout import Module

EXACT, SUBSTRING, DOT_BOUNDARY = "exact", "substring", "dot_boundary"
#: SGLang's `_FALLBACK_FUSED_SHARDS` beyond the model's packed mapping (PR #23467)
SGLANG_FALLBACK_FUSED: dict[str, tuple[str, ...]] = {
    "in_proj_ba": ("in_proj_b", "in_proj_a"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
}


#: how each engine matches fp8 exclusion entries, per release: rows of the engine facts table
#: (validators/engine_facts.py, key FP8_SKIP_MATCHING, values EXACT / SUBSTRING / DOT_BOUNDARY)


def _release(version: str | Sequence[int] | None) -> str | None:
    return version if version is None or isinstance(version, str) else ".".join(map(str, version))


def fp8_matching(engine: str, version: str | Sequence[int] | None = None) -> Fact:
    """The engine-facts row in force for `engine` at `version` (None: the newest); `.value` is
    EXACT | SUBSTRING | DOT_BOUNDARY, `.source` where it was read. The release comes from
    `--engine-version` like every other engine fact."""
    if engine not in engine_facts.NEWEST:
        raise KeyError(f"no fp8 exclusion semantics for engine {engine!r}")
    row = engine_facts.lookup(engine, FP8_SKIP_MATCHING, None, _release(version))
    if row is None:
        raise KeyError(f"no fp8 exclusion semantics for {engine} {version}")
    return row


def fp8_patterns(engine: str, exclusions: Sequence[str], naming: ArchNaming) -> tuple[str, ...]:
    """The exclusion list in the engine's name space: vLLM maps it through the model's
    `hf_to_vllm_mapper` (`Fp8Config.apply_vllm_mapper`); SGLang through its weight-name mapper
    where the model has one (`sglang_maps_patterns`)."""
    if engine == "vllm" or naming.sglang_maps_patterns:
        return tuple(dict.fromkeys(_apply_prefix_map(p, naming.prefix_map) for p in exclusions))
    return tuple(dict.fromkeys(exclusions))


def _path_match(ignored: str, prefix: str) -> bool:
    """SGLang `_module_path_match` (v0.5.11): equal, a dotted ancestor, or a whole-segment run."""
    return ignored == prefix or prefix.startswith(ignored + ".") or f".{ignored}." in f".{prefix}."


def _sglang_shards(prefix: str, naming: ArchNaming) -> tuple[str, ...] | None:
    shards = fused_shards(prefix, naming)
    if shards is not None:
        return shards
    head, _, last = prefix.rpartition(".")
    extra = SGLANG_FALLBACK_FUSED.get(last)
    return tuple(f"{head}.{s}" if head else s for s in extra) if extra else None


def _dot_boundary(prefix: str, patterns: tuple[str, ...], naming: ArchNaming) -> ExclusionHit | None:
    shards = _sglang_shards(prefix, naming)
    if shards is not None:
        hits = [next((p for p in patterns if _path_match(p, s)), None) for s in shards]
        listed = tuple(s for s, h in zip(shards, hits) if h)
        if listed and len(listed) != len(shards):
            raise FusedShardConflict(prefix, listed, tuple(s for s, h in zip(shards, hits) if not h))
        return ExclusionHit(hits[0], "dot_boundary") if listed and hits[0] else None
    for p in patterns:
        if _path_match(p, prefix):
            return ExclusionHit(p, "dot_boundary")
    return _experts_rule(prefix, patterns)


def fp8_exclusion(engine: str, prefix: str, patterns: tuple[str, ...], naming: ArchNaming,
                  version: str | Sequence[int] | None = None) -> ExclusionHit | None:
    """Is the engine layer `prefix` (engine name space; a FusedMoE prefix for routed experts) built
    unquantized under an fp8 config whose (engine-mapped) exclusion list is `patterns`?

    Raises FusedShardConflict where the engine raises "Detected some but not all shards ...".
    """
    matching = fp8_matching(engine, version).value
    if matching == EXACT:
        return VllmSemantics._exact(prefix, patterns, naming)
    if matching == SUBSTRING:
        return _substring(prefix, patterns)
    return _dot_boundary(prefix, patterns, naming)


def _experts_rule(prefix: str, patterns: tuple[str, ...]) -> ExclusionHit | None:
    """Both engines: a FusedMoE prefix inside an ignore entry that names experts excludes the layer."""
    if "experts" in prefix:
        for p in patterns:
            if "experts" in p and prefix in p:
                return ExclusionHit(p, "expert")
    return None


def _substring(prefix: str, patterns: tuple[str, ...]) -> ExclusionHit | None:
    """SGLang up to v0.5.10: HF fp8 configs carry no packed mapping, so a fused prefix is tested as
    itself with a plain substring test; gate_up_proj also when both shards are listed exactly; the
    experts rule (PR #23467 changed only the substring line)."""
    hit = next((p for p in patterns if p and p in prefix), None)
    if hit is not None:
        return ExclusionHit(hit, "substring")
    if "gate_up_proj" in prefix:
        gate, up = prefix.replace("gate_up_proj", "gate_proj"), prefix.replace("gate_up_proj", "up_proj")
        return ExclusionHit(gate, "exact") if gate in patterns and up in patterns else None
    return _experts_rule(prefix, patterns)


def fp8_stale_entries(engine: str, exclusions: Sequence[str], units: set[str], naming: ArchNaming,
                      version: str | Sequence[int] | None = None) -> list[str]:
    """Entries of the exclusion list that exclude no engine layer (`units`: every engine-named layer)
    under the engine's fp8 matching, e.g. wildcards, which neither engine expands."""
    names = set(units)
    for unit in units:      # an exact entry may name one shard of a fused layer
        names.update(fused_shards(unit, naming) or ())
        names.update(_sglang_shards(unit, naming) or ())
    exact = fp8_matching(engine, version).value == EXACT
    stale: list[str] = []
    for entry in dict.fromkeys(exclusions):
        mapped = fp8_patterns(engine, [entry], naming)
        if exact:
            live = mapped[0] in names or _experts_rule_any(mapped[0], units)
        else:
            live = any(_hits(engine, unit, mapped, naming, version) for unit in units)
        if not live:
            stale.append(entry)
    return stale


def _experts_rule_any(entry: str, units: set[str]) -> bool:
    return "experts" in entry and any("experts" in unit and unit in entry for unit in units)


def _hits(engine: str, unit: str, mapped: tuple[str, ...], naming: ArchNaming,
          version: str | Sequence[int] | None) -> bool:
    try:
        return fp8_exclusion(engine, unit, mapped, naming, version) is not None
    except FusedShardConflict:      # listing one shard does something (QG207 reports it)
        return True


# ---- what a mismatch does (formats_beyond_two.md §2 "BF16 experts ... loads_wrong", §7) --------------
def bf16_effect(module: "Module") -> str:
    """Predicted effect text of a BF16 module the engine builds as fp8 (same shape, so no error)."""
    if module.moe_group:
        return ("silent: BF16 experts cast into Fp8MoEMethod's float8 w13_weight/w2_weight (same shape); "
                "w13_weight_scale_inv/w2_weight_scale_inv are never loaded and stay 1.0")
    return ("silent: BF16 weight cast into Fp8LinearMethod's float8 weight; its scale is never loaded and "
            "stays at float32-min (garbage outputs)")


def excluded_effect(engine: str, engine_name: str, suffix: str) -> tuple[bool, str]:
    """(fails, predicted error) for an fp8-quantized module the engine builds unquantized.

    SGLang's loaders skip names without a parameter (`if name not in params_dict: continue`, warning
    "Parameter ... not found in params_dict"): the float8 weight is cast into the BF16 parameter
    unscaled (sglang #23687). vLLM's model loaders raise on the scale (deepseek_v2 KeyError,
    qwen3_moe: `weight_scale_inv` is not an ignored suffix; AutoWeightsLoader "no module or parameter").
    """
    if engine == "sglang":
        return False, (f"silent: float8 weight cast unscaled into the BF16 parameter; 'Parameter "
                       f"{engine_name}.{suffix} not found in params_dict' (sglang #23687)")
    return True, f"KeyError: '{engine_name}.{suffix}'"


def block_split_error(name: str, kind: str, role: str | None, out_features: int, block: int,
                      naming: ArchNaming) -> str | None:
    """The ValueError vLLM and SGLang raise at load when fp8 `block`-row weight blocks cannot follow a
    fused partition of module `name`, or None when its rows load.

    A merged linear's shard other than the last (q/k of qkv, gate of gate_up) must be whole blocks
    (`validate_fp8_block_shape`), and so must a MoE expert's gate/up (`Fp8MoEMethod`). The validator's
    QG320 reports it; the planner leaves such modules BF16 before writing (exporter/recipes.py)."""
    if out_features % block == 0:
        return None
    if kind == "expert":
        if role in ("gate", "up"):
            return (f"ValueError: The output_size of gate's and up's weight = {out_features} is not divisible by "
                    f"weight quantization block_n = {block}.")
        return None
    packed = packed_name(name, naming)
    if packed is not None and name != packed[1][-1]:
        return (f"ValueError: Weight output_partition_size = {out_features} is not divisible by weight "
                f"quantization block_n = {block}.")
    return None
