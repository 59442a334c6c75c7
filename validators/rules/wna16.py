"""QG141, QG24x: GPTQ and AWQ - the config the engines accept and which modules they build quantized.

Compares the bytes (`ctx.a.state`) with what each engine builds (`rules/_wna16.builds`), per engine
layer in the engine's name space. Engine facts and their sources: `validators/dialects_wna16.py`
and reference formats_beyond_two.md §4, §5, §7.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.dialects_wna16 import AWQ_BITS, GPTQ_BITS
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, INFO, LOADS_WRONG, engine_label, finding, no_param
from quantgate.validators.rules._context import BF16, QUANTIZED
from quantgate.validators.rules._wna16 import applies, builds
from quantgate.validators.schemes import GPTQ

SGLANG_SKIPS = ("silent: SGLang's loader skips names absent from params_dict ('Parameter {name} not found in "
                "params_dict, skip loading'); the parameters stay torch.empty")


@rule("QG141", "wna16-config-unsupported", ERROR)
def wna16_config(ctx: Context) -> Iterator[Finding]:
    """A GPTQ / AWQ config the engine rejects (bits, sym) or loads only with slower kernels.

    Why: vLLM `gptq_utils.override_config` raises "Currently, only 2/3/4/8-bit weight quantization is
    supported for GPTQ, but got N bits."; `awq.py` "Currently, only 4-bit weight quantization is
    supported for AWQ"; group_size must be -1 or positive. Outside Marlin's (bits, sym) in
    {(4, True), (8, True)} and group sizes {-1, 32, 64, 128} vLLM falls back to the plain gptq/awq
    kernels (and moe_wna16 for MoE layers, which ignores `dynamic`).

    Fix: export 4- or 8-bit symmetric with group_size 128 (or 32/64/-1).
    """
    if not applies(ctx):
        return
    p = ctx.qc.params
    allowed = GPTQ_BITS if p.method == GPTQ else AWQ_BITS
    name = p.method.upper()
    if p.bits is not None and p.bits not in allowed:
        yield finding("QG141", ERROR, f"{name} bits={p.bits}: {engine_label(ctx)} supports {sorted(allowed)}",
                      modules=[ctx.qc.source], fix=f"Quantize with bits in {sorted(allowed)}.", effect=FAILS,
                      error=f"ValueError: Currently, only {'/'.join(map(str, sorted(allowed)))}-bit weight "
                            f"quantization is supported for {name}, but got {p.bits} bits.")
        return
    if p.group_size is not None and p.group_size != -1 and p.group_size <= 0:
        yield finding("QG141", ERROR, f"{name} group_size={p.group_size} is neither -1 nor positive",
                      modules=[ctx.qc.source], fix="Use group_size 128 (or -1 for one group per row).",
                      effect=FAILS, error=f"ValueError: Unsupported group_size {p.group_size}")
        return
    if ctx.engine == "vllm" and not p.missing and not p.marlin_compatible:
        yield finding("QG141", INFO, f"{name} bits={p.bits} sym={p.sym} group_size={p.group_size} is not "
                      f"Marlin-compatible: vLLM uses the plain {p.method} kernels (MoE layers: moe_wna16)",
                      modules=[ctx.qc.source], fix="4/8-bit symmetric, group_size in {-1, 32, 64, 128} for Marlin.")


def _moe_bf16_error(ctx: Context, unit: str) -> tuple:
    if ctx.engine == "vllm":
        return FAILS, f"KeyError: '{unit}.w13_weight'"
    if ctx.qc.dialect == GPTQ:
        return LOADS_WRONG, SGLANG_SKIPS.format(name=f"{unit}.w13_weight")
    return FAILS, f"KeyError: '{unit}.w13_weight'"     # SGLang awq FusedMoE (sglang PR #20439, #19644)


@rule("QG240", "wna16-bf16-experts-built-quantized", ERROR)
def bf16_experts(ctx: Context) -> Iterator[Finding]:
    """Experts stored BF16 in a MoE layer the engine builds GPTQ/AWQ.

    Why: failure class #1 (formats_beyond_two.md §9). The loader maps `experts.{e}.gate_proj.weight`
    to `experts.w13_weight`, which a quantized FusedMoE does not have: vLLM raises
    `KeyError: 'model.layers.N.mlp.experts.w13_weight'` (qwen3_moe.py `params_dict[name_mapped]`;
    GPTQModel #1455, #2221, vllm #28274). GPTQ: only a `dynamic` `-:` rule matching the FusedMoE prefix
    (`model.layers.N.mlp.experts`) excludes it, and the moe_wna16 fallback ignores even that. AWQ: an
    entry must be a substring of that prefix; the list vLLM derives from the header names single experts,
    which never is. SGLang gptq: names silently skipped (garbage); SGLang awq: KeyError (sglang PR #20439;
    `awq.py` 0149944f builds every Marlin FusedMoE quantized - later write-ups show a
    modules_to_not_convert check there, version boundary not pinned). Both engines' moe_wna16
    fallback (Marlin-unsupported shapes) reads only the config's own AWQ list.

    Fix: quantize those experts, or exclude the layer by its engine prefix: GPTQ
    `"dynamic": {"-:model\\.layers\\.N\\.mlp\\.experts": {}}`, AWQ `modules_to_not_convert: ["model.layers.N."]`.
    """
    if not applies(ctx):
        return
    groups: dict[tuple, list[str]] = defaultdict(list)
    for cls, b in zip(ctx.a.classes, builds(ctx, ctx.engine or "vllm")):
        if cls.kind == "expert" and cls.state.state == BF16 and b.quantized:
            effect, error = _moe_bf16_error(ctx, b.unit)
            groups[(b.how, b.method, effect, error)].extend(cls.names)
    for (how, method, effect, error), names in groups.items():
        yield finding("QG240", ERROR, f"{len(names)} BF16 expert module(s) sit in MoE layers {engine_label(ctx)} "
                      f"builds {method} ({how})", modules=names,
                      fix="Quantize the experts, or exclude the MoE layer by its engine prefix (GPTQ: a dynamic "
                          "`-:` rule matching `...mlp.experts`; AWQ: a modules_to_not_convert entry such as "
                          "`model.layers.N.`).", effect=effect, error=error)


@rule("QG241", "wna16-quantized-experts-built-unquantized", ERROR)
def quantized_experts_excluded(ctx: Context) -> Iterator[Finding]:
    """Quantized experts in a MoE layer the engine builds unquantized (a GPTQ `-:` rule or an AWQ
    modules_to_not_convert entry matches the FusedMoE prefix).

    Why: the unquantized FusedMoE has `w13_weight`, not `w13_qweight`: vLLM raises
    `KeyError: 'model.layers.N.mlp.experts.w13_qweight'` (qwen3_moe.py `params_dict[name_mapped]`).
    AWQ substring entries hit more than meant (`layers.1` matches `layers.10`..`layers.19`).

    Fix: narrow the rule/entry so it matches only the BF16 layers (anchor regexes, end entries with `.`).
    """
    if not applies(ctx):
        return
    groups: dict[str, list[str]] = defaultdict(list)
    units: dict[str, str] = {}
    for cls, b in zip(ctx.a.classes, builds(ctx, ctx.engine or "vllm")):
        if cls.kind == "expert" and cls.state.state == QUANTIZED and not b.quantized:
            groups[b.how].extend(cls.names)
            units.setdefault(b.how, b.unit)
    for how, names in groups.items():
        yield finding("QG241", ERROR, f"{len(names)} quantized expert module(s) sit in MoE layers "
                      f"{engine_label(ctx)} builds unquantized ({how})", modules=names,
                      fix="Narrow the exclusion so it only matches BF16 MoE layers.", effect=FAILS,
                      error=f"KeyError: '{units[how]}.w13_qweight'")


def _built_against_storage(ctx: Context, stored: str, *, built_quantized: bool, missing: str
                           ) -> list[tuple[str, str, object, list[str], str]]:
    """Non-expert modules stored `stored` that the engine builds the other way (quantized or not),
    grouped as (kind, how the engine decided, effect, names, the engine's error for the `missing`
    parameter): vLLM has no parameter for it (fails); SGLang skips the tensor (loads wrong)."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    errors: dict[tuple, str] = {}
    for cls, b in zip(ctx.a.classes, builds(ctx, ctx.engine or "vllm")):
        if cls.kind != "expert" and cls.state.state == stored and bool(b.quantized) == built_quantized \
                and not b.conflict:
            if ctx.engine == "vllm":
                effect, error = FAILS, no_param(b.engine_name, missing)
            else:
                effect, error = LOADS_WRONG, SGLANG_SKIPS.format(name=f"{b.engine_name}.{missing}")
            groups[(cls.kind, b.how, effect)].extend(cls.names)
            errors.setdefault((cls.kind, b.how, effect), error)
    return [(kind, how, effect, names, errors[(kind, how, effect)])
            for (kind, how, effect), names in sorted(groups.items(), key=lambda kv: kv[1][0])]


@rule("QG242", "wna16-bf16-linear-built-quantized", ERROR)
def bf16_linear(ctx: Context) -> Iterator[Finding]:
    """A BF16 Linear (attention, dense MLP, shared expert, router, lm_head) that the engine builds GPTQ/AWQ.

    Why: invariant 7. The quantized layer has `qweight`/`scales`, no `weight`: vLLM raises KeyError or
    "There is no module or parameter named '<prefix>.weight'"; SGLang skips the name with a warning
    and serves uninitialised parameters (Qwen3.5 GDN `in_proj_qkvz`, formats_beyond_two.md §4). In vLLM
    this happens only when the config lists the module (GPTQ modules_in_block_to_quantize, AWQ
    modules_to_not_convert without it): with no list vLLM derives one from the header.

    Fix: list the module as unquantized (GPTQ: a `-:` dynamic rule, and drop it from
    modules_in_block_to_quantize; AWQ: add it to modules_to_not_convert), or quantize it.
    """
    if not applies(ctx):
        return
    for kind, how, effect, names, error in _built_against_storage(ctx, BF16, built_quantized=True,
                                                                   missing="weight"):
        yield finding("QG242", ERROR, f"{len(names)} BF16 {kind} module(s) are built {ctx.qc.dialect.upper()} by "
                      f"{engine_label(ctx)} ({how})", modules=names,
                      fix="Mark them unquantized in the config (GPTQ `-:` dynamic rule / AWQ modules_to_not_convert) "
                          "or quantize them.", effect=effect, error=error)


@rule("QG243", "wna16-quantized-linear-built-unquantized", ERROR)
def quantized_linear_excluded(ctx: Context) -> Iterator[Finding]:
    """A quantized Linear the engine builds unquantized (a GPTQ `-:` rule, a modules_in_block_to_quantize
    list without it, or an AWQ modules_to_not_convert entry that is a substring of its name).

    Why: invariant 8 and failure class #9 (substring collisions). The BF16 layer has no `qweight`:
    vLLM raises KeyError / "There is no module or parameter named '<prefix>.qweight'"; SGLang skips
    the quantized tensors and serves an uninitialised BF16 weight.

    Fix: make the exclusion exact (anchored regex, full module names) or store the module BF16.
    """
    if not applies(ctx):
        return
    for kind, how, effect, names, error in _built_against_storage(ctx, QUANTIZED, built_quantized=False,
                                                                   missing="qweight"):
        yield finding("QG243", ERROR, f"{len(names)} quantized {kind} module(s) are built unquantized by "
                      f"{engine_label(ctx)} ({how})", modules=names,
                      fix="Make the exclusion exact or store these modules BF16.", effect=effect, error=error)


@rule("QG244", "wna16-fused-shards-disagree", ERROR, engines=("vllm",))
def fused_conflict(ctx: Context) -> Iterator[Finding]:
    """The config's list covers only some shards of a fused layer (q/k/v -> qkv_proj, gate/up).

    Why: invariant 9. vLLM `is_layer_gptq_quantized` / `is_layer_skipped` test each shard and raise
    "ValueError: Detected some but not all shards of <prefix> are quantized. All shards of fused
    layers to have the same precision." (vllm #53992).

    Fix: list all shards of the fused layer, or none.
    """
    if not applies(ctx):
        return
    seen: dict[str, list[str]] = defaultdict(list)
    for cls, b in zip(ctx.a.classes, builds(ctx, "vllm")):
        if b.conflict:
            seen[b.unit].extend(cls.names)
    for unit, names in sorted(seen.items()):
        yield finding("QG244", ERROR, f"the config covers only some shards of {unit}", modules=names,
                      fix="Cover all shards of the fused layer, or none.", effect=FAILS,
                      error=f"ValueError: Detected some but not all shards of {unit} are quantized. All shards "
                            "of fused layers to have the same precision.")
