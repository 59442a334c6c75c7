"""QG4xx: routed experts as one MoE layer (count, completeness, one format, naming, gate/up scales)."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator
from operator import attrgetter

from quantgate.validators.dialects import BEYOND_DIALECTS
from quantgate.validators.findings import Finding, VerdictStatus
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, LOADS_WRONG, finding
from quantgate.validators.rules._context import ModClass
from quantgate.validators.rules._values import scale_table
from quantgate.validators.schemes import FP8_NATIVE

#: `experts.{proj}.{e}` order (some ModelOpt Qwen3-VL-MoE exports), vllm#40885
REVERSED_EXPERT_RE = re.compile(r"\.experts\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.(\d+)\.")
#: gate/up weight_scale_2 (CT weight_global_scale) relative tolerance before a mismatch is reported
GATE_UP_RTOL = 1e-6
#: more routed experts than this in a config is not a real model (DeepSeek-V3 has 256, Kimi 384)
MAX_EXPERTS = 1 << 14
GLOBAL_SUFFIXES: tuple[str, ...] = ("weight_scale_2", "weight_global_scale")


_EXPERT, _NAME = attrgetter("expert"), attrgetter("name")


def _experts_by_layer(ctx: Context) -> dict[str, list[ModClass]]:
    groups: dict[str, list[ModClass]] = defaultdict(list)
    for cls in ctx.a.of_kind("expert"):
        groups[cls.moe_group or cls.rep.name.rsplit(".", 2)[0]].append(cls)
    return groups


@rule("QG401", "expert-count", ERROR, per_engine=False)
def expert_count(ctx: Context) -> Iterator[Finding]:
    """Expert indices disagree with the config's expert count (num_experts / num_local_experts /
    n_routed_experts).

    Why: invariant 13. The engine generates names only for ids 0..num_experts-1: extra experts raise
    KeyError / "There is no module or parameter named ...", missing ones stay uninitialised.

    Fix: fix the config's expert count or export every expert.
    """
    n = ctx.a.layout.num_experts
    if not n:
        return
    if n > MAX_EXPERTS or n < 0:
        yield finding("QG401", ERROR, f"config.json declares {n} experts; no engine can build that",
                      modules=["config.json"], fix="Fix the config's expert count.", effect=FAILS,
                      error="RuntimeError: invalid expert count in config")
        return
    extra: list[str] = []
    for group, classes in sorted(_experts_by_layer(ctx).items()):
        extra.extend(m.name for c in classes for m in c.members if m.expert is not None and m.expert >= n)
    if extra:
        yield finding("QG401", ERROR, f"{len(extra)} expert modules have an index >= the config's {n} experts",
                      modules=extra, fix="Make the config's expert count match the checkpoint.", effect=FAILS,
                      error=f"ValueError: There is no module or parameter named '{extra[0]}.weight'")


@rule("QG402", "incomplete-experts", ERROR, per_engine=False)
def incomplete_experts(ctx: Context) -> Iterator[Finding]:
    """A MoE layer lacks some experts or some projections of an expert.

    Why: invariant 14. vLLM does not report parameters that were never loaded in quantized models;
    the missing expert keeps uninitialised weights and scales (garbage for every token routed to it).

    Fix: re-export; every expert of every MoE layer needs gate, up and down projections.
    """
    n = ctx.a.layout.num_experts
    missing: list[str] = []
    for group, classes in sorted(_experts_by_layer(ctx).items()):
        by_role: dict[str, set[int]] = defaultdict(set)
        proj: dict[str, str] = {}
        for c in classes:
            if c.role:
                by_role[c.role].update(map(_EXPERT, c.members))    # None (no index) dropped below
                proj[c.role] = c.rep.name.rpartition(".")[2]
        for present in by_role.values():
            present.discard(None)
        seen = max((max(s) for s in by_role.values() if s), default=-1) + 1
        count = min(n, seen) if n and n > MAX_EXPERTS else (n or seen)   # an absurd config count is QG401's
        for role, present in sorted(by_role.items()):
            missing.extend(f"{group}.{e}.{proj[role]}" for e in range(count) if e not in present)
    if missing:
        yield finding("QG402", ERROR, f"{len(missing)} expert projections are missing", modules=missing,
                      fix="Export every expert's gate, up and down projections.", effect=LOADS_WRONG,
                      error="silent: missing experts keep uninitialised weights")


@rule("QG403", "mixed-expert-formats", ERROR)
def mixed_formats(ctx: Context) -> Iterator[Finding]:
    """The experts of one MoE layer are stored in different formats (some BF16, some quantized, or two
    schemes).

    Why: invariant 15. The engine builds one MoE method per layer (CT checks only expert 0: "All MoE
    projections need to have same quantization scheme"); the odd experts fail with a size mismatch
    or are silently cast (Model-Optimizer #1354 "Modules have different quantization formats").

    Fix: quantize every expert of the layer the same way (calibrate all experts), or none.
    """
    for group, classes in sorted(_experts_by_layer(ctx).items()):
        by_fmt: dict[str, list[str]] = defaultdict(list)
        for c in classes:   # format = stored weight dtype; a missing scale is QG301's business
            by_fmt[f"{c.state.weight_dtype or '?'} {c.state.state}"].extend(map(_NAME, c.members))
        if len(by_fmt) < 2:
            continue
        summary = ", ".join(f"{len(v)} {k}" for k, v in sorted(by_fmt.items(), key=lambda kv: -len(kv[1])))
        minority = sorted(by_fmt.items(), key=lambda kv: len(kv[1]))[0]
        effect: VerdictStatus | None = FAILS
        error = "ValueError: All MoE projections need to have same quantization scheme but found multiple"
        if ctx.qc is not None and ctx.qc.dialect in BEYOND_DIALECTS:
            effect, error = None, ""        # QG240 / QG440 give each engine's effect
        elif ctx.qc is not None and ctx.qc.dialect == FP8_NATIVE:
            # native fp8 checks no scheme per projection: one Fp8MoEMethod (same shapes) takes the BF16
            # experts by a silent cast; an excluded layer is QG203's (the fp8 experts lose their scales)
            from quantgate.validators.fp8_engines import bf16_effect

            effect, error = LOADS_WRONG, bf16_effect(classes[0].rep)
        yield finding("QG403", ERROR, f"experts of {group} mix formats ({summary})", modules=minority[1],
                      fix="Store every expert of the layer in one format.", effect=effect, error=error)


@rule("QG404", "gate-up-global-scale-mismatch", ERROR, per_engine=False, deep=True)
def gate_up_mismatch(ctx: Context) -> Iterator[Finding]:
    """An expert's gate_proj and up_proj global weight scales differ (`weight_scale_2`, CT
    `weight_global_scale`).

    Why: invariant 17. vLLM and SGLang keep only the gate's value for the fused w13 and warn once
    "w1_weight_scale_2 must match w3_weight_scale_2. Accuracy may be affected." -> up_proj is
    dequantised with the wrong scale (NVBug 6142360: output "1\\n1\\n1...").

    Fix: share one amax across gate and up of each expert before packing (ModelOpt >= #1411 does).
    """
    table = scale_table(ctx)
    index = {id(c): i for i, c in enumerate(ctx.a.classes)}
    by_key: dict[tuple[str, str, str], dict[int, tuple[str, float]]] = defaultdict(dict)
    for cls in ctx.a.of_kind("expert"):
        if cls.role not in ("gate", "up") or cls.rep.fused is not None:
            continue
        for suffix in GLOBAL_SUFFIXES:
            values = table.by_class.get((index[id(cls)], suffix))
            if values is None:
                continue
            bucket = by_key[(cls.moe_group or "", cls.role, suffix)]
            for m, v in zip(cls.members, values):
                if v is not None and m.expert is not None:
                    bucket[m.expert] = (m.name, v)
    bad: list[str] = []
    for (group, role, suffix), gates in by_key.items():
        if role != "gate":
            continue
        ups = by_key.get((group, "up", suffix), {})
        for e, (name, g) in gates.items():
            if e in ups and abs(g - ups[e][1]) > GATE_UP_RTOL * max(abs(g), abs(ups[e][1])):
                bad.append(name.rsplit(".", 1)[0])
    if bad:
        yield finding("QG404", ERROR, f"{len(bad)} expert(s) have different gate/up global weight scales",
                      modules=bad, fix="Re-export with gate and up sharing one global scale per expert.",
                      effect=LOADS_WRONG,
                      error="w1_weight_scale_2 must match w3_weight_scale_2. Accuracy may be affected.")


@rule("QG405", "unsupported-expert-naming", ERROR, per_engine=False)
def unsupported_naming(ctx: Context) -> Iterator[Finding]:
    """Per-expert tensors are named `experts.{proj}.{e}` instead of `experts.{e}.{proj}`.

    Why: invariant 13. `make_expert_params_mapping` only knows `experts.{e}.{proj}.`; vLLM fails with
    "IndexError: Dimension out of range" or, after a partial fix, silently drops the scales (vllm#40885).

    Fix: rename to `<moe>.experts.{e}.{gate_proj|up_proj|down_proj}.<suffix>`.
    """
    candidates = list(ctx.a.layout.unassigned) + [f"{n}." for c in ctx.a.of_kind("other") for n in c.names]
    names = sorted({REVERSED_EXPERT_RE.sub(".experts.\\1.{e}.", n).rsplit(".", 1)[0]
                    for n in candidates if REVERSED_EXPERT_RE.search(n)})
    if names:
        yield finding("QG405", ERROR, f"{len(names)} expert tensor families use the `experts.{{proj}}.{{e}}` order "
                      "the engines do not recognise", modules=names,
                      fix="Rename to experts.{e}.{proj}.<suffix>.", effect=FAILS,
                      error="IndexError: Dimension out of range (expected to be in range of [-1, 0], but got 1)")
