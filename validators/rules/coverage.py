"""QG2xx: does the engine build every module in the precision its bytes are stored in?

Each rule compares the bytes (`ctx.a.state`) with what the engine builds (`ctx.a.coverage(engine)`:
exclusion evaluated per engine layer in the engine's own name space).
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.engines import ENGINE_SEMANTICS, FusedShardConflict
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import (
    ERROR,
    FAILS,
    LOADS_WRONG,
    WARNING,
    declared_label,
    declares_packed_4bit,
    finding,
    no_param,
    reverse_size_mismatch,
    size_mismatch,
)
from quantgate.validators.rules._context import BF16, QUANTIZED, Cov, ModClass
from quantgate.validators.schemes import FP8_NATIVE

#: kinds whose BF16-not-excluded case has its own rule or is never quantized
SPECIAL_KINDS = frozenset({"expert", "norm", "embedding", "lm_head", "vision", "projector"})
#: kinds whose quantized-but-excluded case has its own rule (QG208 vision, QG209 router, QG210 lm_head)
OWN_RULE_KINDS = frozenset({"router", "vision", "projector", "norm", "embedding", "lm_head"})


def _bf16_not_excluded(ctx: Context, kinds: set[str] | None = None,
                       exclude_kinds: frozenset[str] = frozenset()) -> Iterator[tuple[ModClass, Cov]]:
    """Classes stored BF16 that the current engine builds quantized."""
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm")):
        if (kinds is not None and cls.kind not in kinds) or cls.kind in exclude_kinds:
            continue
        if cls.state.state == BF16 and not c.excluded and c.conflict is None:
            yield cls, c


def _effect(ctx: Context, module) -> tuple:
    """BF16 data in a module the engine quantizes: 4-bit packed params -> size mismatch; FP8/INT8 ->
    silent cast with scale 1.0 (invariant 16)."""
    if ctx.qc is not None and ctx.qc.dialect == FP8_NATIVE:
        from quantgate.validators.fp8_engines import bf16_effect

        return LOADS_WRONG, bf16_effect(module)
    if ctx.qc is not None and ctx.qc.is_ct and module.moe_group and declares_packed_4bit(ctx, module):
        # CT packed MoE methods register `w13/w2_weight_packed`: a BF16 `.weight` finds no parameter
        # (reference lab_llmc_vllm.md: vLLM 0.32 fused_moe/routed_experts.py load_weights)
        return FAILS, (f"AttributeError: Layer {module.moe_group} has no parameter 'w2_weight' for checkpoint "
                       f"weight '{module.moe_group}.0.<down>.weight'")
    if declares_packed_4bit(ctx, module):
        return FAILS, size_mismatch(module)
    return LOADS_WRONG, "silent: BF16 weight cast to the quantized dtype with uninitialised scales"


@rule("QG201", "bf16-not-excluded", ERROR)
def bf16_not_excluded(ctx: Context) -> Iterator[Finding]:
    """A BF16 module (no scale tensors) is not excluded under the engine's matching, so the engine
    builds it quantized.

    Why: invariant 7. vLLM/SGLang create packed NVFP4 parameters and fail copying the BF16 weight
    ("The size of tensor a (512) must match the size of tensor b (1024)"; for a router
    ReplicatedLinear "Tried to load weights of size [128, 2048] to a parameter of size [128, 1024]",
    Model-Optimizer#1858); under FP8 the weight is silently cast with a default scale.

    Fix: add the module to exclude_modules / ignore with a name that matches in the engine's prefix
    space (prefer `prefix*` wildcards), or quantize it.
    """
    if not ctx.a.active:
        return
    groups: dict[tuple, list[str]] = defaultdict(list)
    for cls, _ in _bf16_not_excluded(ctx, exclude_kinds=SPECIAL_KINDS):
        m = cls.rep
        effect, error = _effect(ctx, m)
        if cls.kind == "router" and effect is FAILS:
            error = (f"AssertionError: Tried to load weights of size [{m.out_features}, {m.in_features}] to a "
                     f"parameter of size [{m.out_features}, {(m.in_features or 0) // 2}]")
        groups[(cls.kind, effect, error)].extend(cls.names)
    for (kind, effect, error), names in sorted(groups.items(), key=lambda kv: kv[1][0]):
        yield finding("QG201", ERROR, f"{len(names)} BF16 {kind} module(s) are neither quantized nor excluded; "
                      f"the engine builds them as {declared_label(ctx)}", modules=names,
                      fix="Exclude them (exclude_modules/ignore, in the engine's name space) or quantize them.",
                      effect=effect, error=error)


def _hf_space_hit(ctx: Context, hf_unit: str) -> str | None:
    """Would an exclude entry match the layer under its Hugging Face name (no engine renames)?"""
    if ctx.qc is not None and ctx.qc.dialect == FP8_NATIVE:
        from quantgate.validators.engines import DEFAULT_NAMING
        from quantgate.validators.fp8_engines import fp8_exclusion

        try:
            hit = fp8_exclusion(ctx.engine or "vllm", hf_unit, tuple(ctx.qc.exclude), DEFAULT_NAMING,
                                ctx.a.engine_version(ctx.engine or "vllm"))
        except FusedShardConflict:
            return None
        return hit.pattern if hit else None
    sem = ENGINE_SEMANTICS[ctx.engine or "vllm"]
    for pattern in ctx.qc.exclude if ctx.qc else ():
        try:
            if sem.match(hf_unit, sem.engine_patterns([pattern], None), None):
                return pattern
        except FusedShardConflict:  # reported by QG207
            continue
    return None


@rule("QG202", "experts-left-bf16", ERROR)
def experts_left_bf16(ctx: Context) -> Iterator[Finding]:
    """Routed experts are stored BF16 while the config claims a quantized scheme, and the engine does
    not exclude their MoE layer.

    Why: invariants 7, 15, 16; the headline failure (vllm PR #37059, #53790; ModelOpt 0.41-0.43 on
    Gemma4 fused experts). vLLM builds NVFP4 MoE parameters `w13_weight [E, 2I, H/2]` and `_load_w13`
    fails: "RuntimeError: The size of tensor a (H/2) must match the size of tensor b (H)"; under FP8
    the experts are silently cast (garbage).

    Fix: quantize the experts (ModelOpt >= 0.44 handles fused experts) or exclude the MoE layer under
    its engine name (e.g. Gemma4 `model.layers.N.moe.experts`; `*layers.N.*experts*` covers both spellings).
    """
    if not ctx.a.active:
        return
    by_effect: dict[tuple, list[str]] = defaultdict(list)
    for cls, _ in _bf16_not_excluded(ctx, kinds={"expert"}):
        if cls.moe_group and _hf_space_hit(ctx, cls.moe_group):
            continue        # QG205 explains these
        by_effect[_effect(ctx, cls.rep)].extend(cls.names)
    for (effect, error), names in by_effect.items():
        yield finding("QG202", ERROR, f"experts left BF16 while config claims {declared_label(ctx)}: {len(names)} "
                      f"expert modules are not excluded, so the engine builds {declared_label(ctx)} MoE parameters "
                      "for them", modules=names,
                      fix="Quantize the experts, or exclude their MoE layers by the engine's name "
                      "(wildcards such as `*layers.N.*experts*` cover both spellings).", effect=effect, error=error)


@rule("QG203", "quantized-but-excluded", ERROR)
def quantized_but_excluded(ctx: Context) -> Iterator[Finding]:
    """A module carries quantized tensors but the engine builds it unquantized (excluded, not listed in
    MIXED_PRECISION quantized_layers, or not targeted by any compressed-tensors group).

    Why: invariants 8, 24. The unquantized module has no scale parameters: "There is no module or
    parameter named 'lm_head.input_scale'" (vllm#44081) or a size mismatch on the packed weight.

    Fix: remove the module from exclude_modules / ignore (or list it in quantized_layers), or store it BF16.
    """
    if not ctx.a.active:
        return
    groups: dict[tuple[str, str], tuple[list[str], str, object]] = {}
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm")):
        if cls.state.state != QUANTIZED or not c.excluded or c.conflict or cls.kind in OWN_RULE_KINDS:
            continue
        if c.forced in ("vision", "unquantized_role", "spec_layer_skipped"):
            continue
        if c.hit is not None and c.hit.how == "substring" and ctx.qc is not None and ctx.qc.is_modelopt and \
                _only_substring(ctx, c.unit):
            continue        # QG206
        st = cls.state
        why = {"not_listed": "absent from quantized_layers", "not_targeted": "targeted by no config group"}.get(
            c.forced or "", f"excluded by {c.hit.pattern!r} ({c.hit.how})" if c.hit else "excluded")
        effect = FAILS
        if declares_packed_4bit(ctx, cls.rep) and st.weight_dtype == "U8":
            error = reverse_size_mismatch(cls.rep)
        elif ctx.qc is not None and ctx.qc.dialect == FP8_NATIVE:
            from quantgate.validators.fp8_engines import excluded_effect

            fails, error = excluded_effect(ctx.engine or "vllm", c.engine_name,
                                           st.scale_suffixes[0] if st.scale_suffixes else "weight_scale_inv")
            effect = FAILS if fails else LOADS_WRONG
        else:
            error = no_param(c.engine_name, st.scale_suffixes[0] if st.scale_suffixes else "weight_scale")
        groups.setdefault((why, cls.kind), ([], error, effect))[0].extend(cls.names)
    for (why, kind), (names, error, effect) in sorted(groups.items()):
        yield finding("QG203", ERROR, f"{len(names)} quantized {kind} module(s) are built unquantized by "
                      f"the engine: {why}", modules=names,
                      fix="Drop the exclude entry (or list the module as quantized), or store the module BF16.",
                      effect=effect, error=error)


def _only_substring(ctx: Context, unit: str) -> bool:
    """True when only vLLM's plain-substring test excludes `unit` (exact and fnmatch do not)."""
    sem = ENGINE_SEMANTICS[ctx.engine or "vllm"]
    patterns = sem.engine_patterns(ctx.qc.exclude if ctx.qc else [], ctx.a.architecture)
    try:
        exact = sem._exact(unit, patterns, ctx.a.naming)
    except Exception:  # noqa: BLE001
        return False
    return exact is None and not any(fnmatch.fnmatchcase(unit, p) for p in patterns)


@rule("QG204", "stale-exclude-entry", WARNING)
def stale_exclude(ctx: Context) -> Iterator[Finding]:
    """An exclude entry matches no module in the engine's name space.

    Why: invariant 10. Entries written in Hugging Face names that the engine renames (Gemma4
    `experts` -> `moe.experts`, multimodal `model.language_model.` prefixes) silently exclude nothing
    (vllm#28072, PR #53790, sglang PR #38781); a stale list hides which modules really are BF16.

    Fix: rewrite the entry so it matches in the engine's prefix space, or delete it.
    """
    if not ctx.a.active:
        return
    reported = _hf_only_patterns(ctx)
    stale = [p for p in ctx.a.stale_patterns(ctx.engine or "vllm") if p not in reported]
    if stale:
        yield finding("QG204", WARNING, f"{len(stale)} exclude entr{'y' if len(stale) == 1 else 'ies'} match no "
                      f"module in the engine's name space: {', '.join(stale[:8])}", modules=stale,
                      fix="Rewrite the entries in the engine's module names (or drop them).")


def _hf_only_patterns(ctx: Context) -> set[str]:
    out: set[str] = set()
    for cls, _ in _bf16_not_excluded(ctx, kinds={"expert"}):
        hit = _hf_space_hit(ctx, cls.moe_group) if cls.moe_group else None
        if hit:
            out.add(hit)
    return out


@rule("QG205", "experts-excluded-under-hf-name", ERROR)
def experts_hf_name_only(ctx: Context) -> Iterator[Finding]:
    """BF16 experts are excluded only under their Hugging Face name, which the engine never matches.

    Why: invariant 10. vLLM renames Gemma4 `model.layers.N.experts` to `model.layers.N.moe.experts`
    inside the model's weight iterator but does not rename exclude patterns, so `model.layers.N.experts*`
    matches nothing; the MoE layer is built NVFP4 and loading fails with a size mismatch (§4.5).

    Fix: exclude the engine name (`model.layers.N.moe.experts`) or a wildcard covering both spellings
    (`*layers.N.*experts*`), or quantize the experts.
    """
    if not ctx.a.active:
        return
    by_pattern: dict[tuple, list[str]] = defaultdict(list)
    for cls, c in _bf16_not_excluded(ctx, kinds={"expert"}):
        hit = _hf_space_hit(ctx, cls.moe_group) if cls.moe_group else None
        if hit:
            effect, error = _effect(ctx, cls.rep)
            by_pattern[(hit, c.unit, effect, error)].extend(cls.names)
    merged: dict[tuple, tuple[list[str], list[str], list[str]]] = {}
    for (pattern, unit, effect, error), names in by_pattern.items():
        entry = merged.setdefault((effect, error), ([], [], []))
        entry[0].append(pattern)
        entry[1].append(unit)
        entry[2].extend(names)
    for (effect, error), (patterns, units, names) in merged.items():
        yield finding("QG205", ERROR, f"{len(names)} BF16 expert modules are excluded only under their Hugging Face "
                      f"name ({', '.join(sorted(set(patterns))[:4])}); the engine names the MoE layers "
                      f"{', '.join(sorted(set(units))[:2])}{' ...' if len(set(units)) > 2 else ''} and builds them "
                      f"{declared_label(ctx)}", modules=names,
                      fix="Exclude the engine's names or use `*layers.N.*experts*` wildcards that cover both.",
                      effect=effect, error=error, patterns=sorted(set(patterns)))


@rule("QG206", "substring-false-positive", ERROR, engines=("vllm",))
def substring_false_positive(ctx: Context) -> Iterator[Finding]:
    """An exclude entry is a literal substring of a quantized module's vLLM prefix, so vLLM excludes it
    (e.g. `model.layers.0.mlp.gate` excludes `model.layers.0.mlp.gate_up_proj`).

    Why: invariant 11. vLLM's `is_layer_excluded` keeps a plain-substring test for old ModelOpt
    checkpoints; the quantized module is built BF16 and its packed weight / scales fail to load.

    Fix: anchor the entry (exact name of the router, or `...mlp.gate.*`-free exact form that is not a
    prefix of a quantized sibling), e.g. list routers by exact name only where no sibling extends it.
    """
    if not ctx.a.active or (ctx.qc and not ctx.qc.is_modelopt):
        return
    hits: dict[str, list[str]] = defaultdict(list)
    errors: dict[str, str] = {}
    for cls, c in zip(ctx.a.classes, ctx.a.coverage("vllm")):
        if cls.state.state != QUANTIZED or cls.kind in OWN_RULE_KINDS:
            continue
        if c.excluded and c.forced is None and c.hit and c.hit.how == "substring" and _only_substring(ctx, c.unit):
            hits[c.hit.pattern].extend(cls.names)
            errors[c.hit.pattern] = (reverse_size_mismatch(cls.rep) if cls.state.weight_dtype == "U8"
                                     else no_param(c.engine_name, "weight_scale"))
    for pattern, names in sorted(hits.items()):
        yield finding("QG206", ERROR, f"exclude entry {pattern!r} is a substring of {len(names)} quantized "
                      "module name(s); vLLM's substring rule builds them unquantized", modules=names,
                      fix=f"Replace {pattern!r} by a pattern that is not a prefix of quantized siblings.",
                      effect=FAILS, error=errors[pattern], pattern=pattern)


@rule("QG207", "fused-shards-disagree", ERROR)
def fused_shards_disagree(ctx: Context) -> Iterator[Finding]:
    """Shards of one fused engine layer (q/k/v -> qkv_proj, gate/up -> gate_up_proj) disagree: some
    listed in the exclude list and some not, or some quantized and some BF16.

    Why: invariant 9. vLLM and SGLang raise "ValueError: Detected some but not all shards of
    <prefix> are quantized. All shards of fused layers to have the same precision." (vllm#53992).

    Fix: exclude or quantize all shards of the fused layer together.
    """
    if not ctx.a.active:
        return
    conflicts: dict[str, list[str]] = defaultdict(list)
    states: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm")):
        if c.conflict is not None:
            conflicts[c.unit].extend(cls.names)
        elif c.unit != c.engine_name and cls.kind != "expert":
            states[c.unit][cls.state.state].extend(cls.names)
    for unit, names in sorted(conflicts.items()):
        yield finding("QG207", ERROR, f"only some shards of {unit} are listed in the exclude list", modules=names,
                      fix="List all shards (or none) of the fused layer.", effect=FAILS,
                      error=f"ValueError: Detected some but not all shards of {unit} are quantized. All shards "
                      "of fused layers to have the same precision.")
    for unit, by_state in sorted(states.items()):
        if by_state.get(QUANTIZED) and by_state.get(BF16):
            yield finding("QG207", ERROR, f"shards of {unit} are stored in different precisions "
                          f"({len(by_state[QUANTIZED])} quantized, {len(by_state[BF16])} BF16)",
                          modules=by_state[QUANTIZED] + by_state[BF16],
                          fix="Quantize all shards of the fused layer with one scheme, or none.", effect=FAILS,
                          error=f"ValueError: Detected some but not all shards of {unit} are quantized.")


@rule("QG208", "vision-quantized", ERROR, engines=("vllm",))
def vision_quantized(ctx: Context) -> Iterator[Finding]:
    """A vision-tower module is stored quantized, but vLLM builds every module whose path contains
    `vision_tower`, `vision_model` or `visual` unquantized under ModelOpt.

    Why: invariant 12 (hard-coded in `ModelOptQuantConfigBase.get_quant_method`); the scale tensors
    have no parameter ("There is no module or parameter named ...weight_scale") and packed weights
    mismatch. Quantized vision towers also gave garbage image embeddings (Model-Optimizer #1691).

    Fix: keep the vision tower BF16 (exclude `*vision_tower*` / `*visual*` when exporting).
    """
    if not ctx.a.active:
        return
    hits = [(cls, c) for cls, c in zip(ctx.a.classes, ctx.a.coverage("vllm"))
            if cls.state.state == QUANTIZED and c.forced == "vision"]
    if hits:
        names = [n for cls, _ in hits for n in cls.names]
        cls, c = hits[0]
        yield finding("QG208", ERROR, f"{len(names)} vision module(s) are quantized; vLLM builds vision towers "
                      "unquantized", modules=names, fix="Store the vision tower in BF16.", effect=FAILS,
                      error=no_param(c.engine_name, (cls.state.scale_suffixes or ("weight_scale",))[0]))


@rule("QG209", "router-quantized", ERROR)
def router_quantized(ctx: Context) -> Iterator[Finding]:
    """A MoE router (`mlp.gate`, `router`, `router.proj`, `shared_expert_gate`) carries scale tensors or
    packed weights.

    Why: invariant 20. Many engine models build routers without a quant config (Gemma4 `GateLinear`)
    or they are excluded: the scales raise KeyError / "There is no module or parameter named
    ...router.proj.input_scale" and packed weights mismatch. Quantized routers also hurt routing accuracy.

    Fix: keep routers BF16 without scale tensors and list them in exclude_modules.
    """
    fails: list[tuple[ModClass, Cov]] = []
    degrades: list[str] = []
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm")):
        if cls.kind != "router" or (not cls.state.scale_suffixes and cls.state.state != QUANTIZED):
            continue
        if c.excluded:
            fails.append((cls, c))
        else:
            degrades.extend(cls.names)
    if fails:
        cls, c = fails[0]
        names = [n for f, _ in fails for n in f.names]
        yield finding("QG209", ERROR, f"{len(names)} router(s) carry scale tensors but the engine builds "
                      "them unquantized", modules=names, fix="Drop the router scales; keep routers BF16.",
                      effect=FAILS, error=no_param(c.engine_name, (cls.state.scale_suffixes or ("weight_scale",))[0]))
    if degrades:
        yield finding("QG209", WARNING, f"{len(degrades)} router(s) are quantized; routing logits lose precision",
                      modules=degrades, fix="Keep routers BF16 and list them in exclude_modules.")


@rule("QG210", "lm-head-mismatch", ERROR)
def lm_head_mismatch(ctx: Context) -> Iterator[Finding]:
    """lm_head precision disagrees with what the engine builds: BF16 and not excluded under NVFP4
    (vLLM quantizes ParallelLMHead with NVFP4), or quantized but excluded.

    Why: invariants 7, 8. A BF16 lm_head loaded into an NVFP4 LM head fails with a size mismatch; a
    quantized one that is excluded fails with "There is no module or parameter named
    'lm_head.input_scale'" (vllm#44081, nvidia/Qwen3.6-35B-A3B-NVFP4).

    Fix: list `lm_head` in exclude_modules and store it BF16 (what ModelOpt does), or quantize it and
    drop the exclude entry.
    """
    if not ctx.a.active:
        return
    for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm")):
        if cls.kind != "lm_head":
            continue
        m, st = cls.rep, cls.state
        if st.state == BF16 and not c.excluded and ctx.qc and ctx.qc.is_modelopt and declares_packed_4bit(ctx, m):
            yield finding("QG210", ERROR, f"{m.name} is BF16 but not excluded; the engine builds an "
                          f"{declared_label(ctx)} LM head", modules=[m.name],
                          fix="Add `lm_head` to exclude_modules.", effect=FAILS, error=size_mismatch(m))
        elif st.state == QUANTIZED and c.excluded:
            yield finding("QG210", ERROR, f"{m.name} is quantized but excluded ({c.hit.pattern if c.hit else c.forced})",
                          modules=[m.name], fix="Remove `lm_head` from exclude_modules or store it BF16.",
                          effect=FAILS, error=no_param(c.engine_name, (st.scale_suffixes or ("input_scale",))[0]))
