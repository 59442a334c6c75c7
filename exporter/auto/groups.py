"""The decision units of `auto`: groups of modules that must share one scheme.

Engines fuse some Linears into one kernel and then need one number format for all of them:
q/k/v and gate/up (the layout's `fused_group`), and every routed expert of one MoE layer (the
layout's `moe_group`: vLLM builds one FusedMoE, with one quant method, per layer). A decision
group is the connected component of modules linked by either key, so an expert's gate/up pair
and the layer's other experts land in the same group.

Only decoder Linears are candidates (the kinds `quantgate.exporter.recipes` quantizes); routers, lm_head,
embeddings, towers and projectors always stay BF16 and are not part of the bit budget. A group
may take a scheme only when every member's shape can hold it (NVFP4 needs in_features % 16 == 0);
a group one of whose members `--exclude` names keeps BF16 only, but still counts in the budget:
the effective bits we report are those of every decoder Linear of the export.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from quantgate.exporter.recipes import DECODER_LINEAR_KINDS, DIALECT
from quantgate.validators.errors import UsageError
from quantgate.validators.layout import Layout, Module
from quantgate.validators.schemes import MIXED_PRECISION_ALGOS, SchemeSpec, bits_per_weight, scheme

#: The name BF16 (no quantization) goes by in candidate lists, score tables and plans.
BF16 = "BF16"
#: Bits per weight of a module left unquantized.
BF16_BITS = bits_per_weight(None)


def candidate_specs(candidates: Iterable[str]) -> tuple[SchemeSpec, ...]:
    """Resolve `--candidates nvfp4,fp8` to ModelOpt scheme specs a MIXED_PRECISION export can hold.

    BF16 is always a candidate and is not a scheme: naming it is allowed and ignored.
    """
    specs: dict[str, SchemeSpec] = {}
    for raw in candidates:
        name = raw.strip()
        if not name or name.upper() == BF16:
            continue
        try:
            spec = scheme(DIALECT, name)
        except KeyError:
            spec = None
        if spec is None or spec.quant_algo not in MIXED_PRECISION_ALGOS:
            allowed = ", ".join(a.lower() for a in MIXED_PRECISION_ALGOS)
            raise UsageError(
                f"auto: candidate {raw!r} is not a scheme a MIXED_PRECISION export can hold; "
                f"choose from {allowed} (BF16 is always a candidate)"
            )
        specs[spec.name] = spec
    return tuple(sorted(specs.values(), key=bits_per_weight))


@dataclass(frozen=True)
class DecisionGroup:
    """Modules that take one scheme together, and which schemes they can take."""

    key: str  # moe_group, else fused_group, else the module name
    modules: tuple[str, ...]  # member module names, sorted
    numel: int  # Σ out_features × in_features over the members (logical shapes)
    allowed: tuple[str, ...]  # scheme names every member can hold, BF16 always last
    reason: str | None = None  # why a candidate (or all of them) is ruled out, if one is

    def bits_cost(self, scheme_name: str) -> float:
        """numel × bits for this group under `scheme_name` (BF16 included)."""
        return self.numel * scheme_bits(scheme_name)


def scheme_bits(scheme_name: str) -> float:
    """Bits per weight of a candidate name: NVFP4 4.5 (scales included), FP8 8, BF16 16."""
    if scheme_name == BF16:
        return BF16_BITS
    return bits_per_weight(scheme(DIALECT, scheme_name))


def is_quantizable(module: Module) -> bool:
    """A decoder Linear with a known logical shape (a 2-D weight, or a virtual fused-expert slice)."""
    if module.kind not in DECODER_LINEAR_KINDS or module.out_features is None or module.in_features is None:
        return False
    weight = module.tensors.get("weight")
    return module.fused is not None or (weight is not None and len(weight.shape) == 2)


def shape_problem(module: Module, spec: SchemeSpec) -> str | None:
    """Why `module` cannot hold `spec` (divisibility of its logical shape), or None."""
    assert module.out_features is not None and module.in_features is not None
    if module.in_features % spec.in_divisor:
        return (
            f"{module.name}: in_features {module.in_features} is not divisible by {spec.in_divisor} "
            f"({spec.name})"
        )
    if module.out_features % spec.out_divisor:
        return (
            f"{module.name}: out_features {module.out_features} is not divisible by "
            f"{spec.out_divisor} ({spec.name})"
        )
    return None


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def _group_key(members: Sequence[Module]) -> str:
    """The most telling name of a group: its MoE layer, else its fused group, else the module."""
    for attr in ("moe_group", "fused_group"):
        keys = sorted({getattr(m, attr) for m in members if getattr(m, attr)})
        if keys:
            return keys[0]
    return members[0].name


def decision_groups(
    layout: Layout, candidates: Sequence[SchemeSpec], exclude: Sequence[str] = ()
) -> list[DecisionGroup]:
    """Every decision group of `layout`'s decoder Linears, sorted by key.

    `exclude` holds fnmatch patterns on module names (as `--exclude`): a group with a matching
    member can only stay BF16.
    """
    modules = [m for m in layout.modules.values() if is_quantizable(m)]
    if not modules:
        raise UsageError(f"auto: {layout.architecture or 'this model'} has no decoder Linear to quantize")
    uf = _UnionFind()
    for m in modules:
        uf.find(m.name)
        for key in (m.fused_group, m.moe_group):
            if key:
                uf.union(m.name, "\0" + key)  # keys live in their own namespace
    members: dict[str, list[Module]] = {}
    for m in modules:
        members.setdefault(uf.find(m.name), []).append(m)
    groups = [_make_group(sorted(ms, key=lambda m: m.name), candidates, exclude) for ms in members.values()]
    return sorted(groups, key=lambda g: g.key)


def _make_group(
    members: list[Module], candidates: Sequence[SchemeSpec], exclude: Sequence[str]
) -> DecisionGroup:
    key = _group_key(members)
    numel = sum(m.out_features * m.in_features for m in members)  # type: ignore[operator]
    hit = next(
        (
            f"{m.name} is excluded by --exclude {p}"
            for m in members
            for p in exclude
            if fnmatch.fnmatchcase(m.name, p)
        ),
        None,
    )
    if hit is not None:
        return DecisionGroup(key, tuple(m.name for m in members), numel, (BF16,), hit)
    allowed: list[str] = []
    problems: list[str] = []
    for spec in candidates:
        problem = next((p for m in members if (p := shape_problem(m, spec)) is not None), None)
        if problem is None:
            allowed.append(spec.name)
        else:
            problems.append(problem)
    return DecisionGroup(
        key, tuple(m.name for m in members), numel, (*allowed, BF16), "; ".join(problems) or None
    )


def effective_bits(groups: Sequence[DecisionGroup], choice: dict[str, str]) -> float:
    """Σ(numel × bits) / Σ numel over the groups, for `choice` (group key -> scheme name or BF16)."""
    total = sum(g.numel for g in groups)
    return sum(g.bits_cost(choice[g.key]) for g in groups) / total
