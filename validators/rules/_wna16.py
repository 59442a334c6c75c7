"""What vLLM and SGLang build for each module class of a GPTQ or AWQ checkpoint (cached per engine).

The decisions follow `validators/dialects_wna16.py` (sources there): per engine layer (a fused
qkv/gate_up Linear, a FusedMoE `...mlp.experts`), in the engine's name space, with the header-derived
lists vLLM builds when the config has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantgate.validators.dialects_wna16 import (
    GPTQ_DEFAULT_QUANTIZED,
    SubstringIndex,
    WNA16Params,
    derived_not_convert,
    derived_quantized,
    marlin_moe_supported,
)
from quantgate.validators.engines import ENGINE_SEMANTICS, _apply_prefix_map, engine_unit, fused_shards
from quantgate.validators.schemes import AWQ, GPTQ

if TYPE_CHECKING:
    from quantgate.validators.rules import Context
    from quantgate.validators.rules._context import ModClass

NEVER = frozenset({"norm", "embedding"})
WNA16_DIALECTS = frozenset({GPTQ, AWQ})


@dataclass(frozen=True)
class Build:
    """One engine layer as an engine builds it."""

    unit: str               # the engine layer (engine name space)
    engine_name: str        # the class representative's engine name
    quantized: bool
    how: str                # why, in words (the rule, list entry or kernel fallback that decided)
    method: str             # gptq_marlin | gptq | moe_wna16 | awq_marlin | awq | unquantized
    conflict: tuple[str, ...] = ()   # fused shards that disagree (the engine raises)


def applies(ctx: "Context") -> bool:
    return ctx.qc is not None and ctx.qc.dialect in WNA16_DIALECTS and ctx.qc.params is not None


def builds(ctx: "Context", engine: str) -> list[Build]:
    """Build per class, in `ctx.a.classes` order."""
    cache = ctx.a.__dict__.setdefault("_wna16_builds", {})
    if engine not in cache:
        cache[engine] = _Planner(ctx, engine).run()
    return cache[engine]


class _Planner:
    def __init__(self, ctx: "Context", engine: str) -> None:
        self.ctx, self.engine = ctx, engine
        self.a = ctx.a
        self.p: WNA16Params = ctx.qc.params
        self.sem = ENGINE_SEMANTICS[engine]
        self.arch = self.a.architecture
        self.naming = self.a.naming
        self.hidden = _hidden(ctx)
        self._units: dict[tuple[str, bool], tuple[bool, str, str, tuple[str, ...]]] = {}
        self._lists: dict[str, tuple[SubstringIndex, str]] = {}

    def mapped(self, entries: list[str]) -> list[str]:
        """`apply_vllm_mapper` maps the lists through the model's prefix map."""
        return [_apply_prefix_map(e, self.naming.prefix_map) for e in entries]

    # the lists each engine consults (built once per validation) ----------------------------------
    def _list(self, key: str) -> tuple[SubstringIndex, str]:
        if key not in self._lists:
            entries, what = self._build_list(key)
            self._lists[key] = SubstringIndex(entries), what
        return self._lists[key]

    def _build_list(self, key: str) -> tuple[list[str], str]:
        if key == "gptq":
            given = self.p.modules_in_block_to_quantize
            if given:
                return self.mapped(given), "modules_in_block_to_quantize"
            derived = derived_quantized(self.ctx.view.tensors)
            if derived:
                return self.mapped(derived), "modules_in_block_to_quantize derived from the header"
            return list(GPTQ_DEFAULT_QUANTIZED), "vLLM's default (attention only)"
        given = self.p.modules_to_not_convert
        if given:
            return self.mapped(given), "modules_to_not_convert"
        if key == "awq_derived":
            return self.mapped(derived_not_convert(self.ctx.view.tensors)), \
                "modules_to_not_convert derived from the header (all-float modules)"
        return [], "modules_to_not_convert (absent)"

    def gptq_quantized_list(self) -> tuple[SubstringIndex, str]:
        return self._list("gptq")

    def awq_not_convert(self, *, derive: bool) -> tuple[SubstringIndex, str]:
        return self._list("awq_derived" if derive else "awq_config")

    # decisions -------------------------------------------------------------------------------------
    def run(self) -> list[Build]:
        out: list[Build] = []
        for cls in self.a.classes:
            rep = cls.rep
            ename = self.sem.engine_name(rep.name, self.arch)
            if cls.kind in NEVER:
                out.append(Build(ename, ename, False, "never quantized", "unquantized"))
                continue
            # routers / shared-expert gates built without a quant config: engine facts per architecture and
            # release (validators/engine_facts.py UNQUANTIZED_ROLES, at --engine-version)
            if rep.role in self.a.unquantized_roles(self.engine):
                out.append(Build(ename, ename, False, "built without a quant config", "unquantized"))
                continue
            if cls.kind == "lm_head" and not self.p.lm_head:   # ParallelLMHead is quantized only with `lm_head: true`
                out.append(Build(ename, ename, False, "lm_head: false", "unquantized"))
                continue
            moe = cls.kind == "expert" and cls.moe_group is not None
            unit = self.sem.engine_name(cls.moe_group, self.arch) if moe else engine_unit(ename, self.naming)
            key = (unit, moe)
            if key not in self._units:
                self._units[key] = self._moe(unit, cls) if moe else self._linear(unit)
            quantized, how, method, conflict = self._units[key]
            out.append(Build(unit, ename, quantized, how, method, conflict))
        return out

    def _linear(self, unit: str) -> tuple[bool, str, str, tuple[str, ...]]:
        vllm = self.engine == "vllm"
        method = self.p.engine_method()
        rule = self.p.skipped_by_dynamic(unit)
        if self.p.method == GPTQ and rule is not None:
            return False, f"dynamic rule {rule.raw!r} matches its name", "unquantized", ()
        if self.p.method == GPTQ:
            if not vllm:   # SGLang gptq.py: Linear honours `dynamic` only
                return True, "SGLang quantizes every Linear not matched by a dynamic `-:` rule", method, ()
            entries, what = self.gptq_quantized_list()
            hit, conflict = self._substring(unit, entries)
            if conflict:
                return False, what, method, conflict
            return (True, f"{what} entry {hit!r} is a substring of its name", method, ()) if hit else \
                (False, f"no {what} entry is a substring of its name", "unquantized", ())
        entries, what = self.awq_not_convert(derive=vllm)
        hit, conflict = self._substring(unit, entries)
        if conflict:
            return False, what, method, conflict
        return (False, f"{what} entry {hit!r} is a substring of its name", "unquantized", ()) if hit else \
            (True, f"no {what} entry is a substring of its name", method, ())

    def _substring(self, unit: str, entries: SubstringIndex) -> tuple[str | None, tuple[str, ...]]:
        """An entry hitting the unit; vLLM tests fused layers per shard (shards that disagree -> conflict),
        SGLang's `is_layer_skipped_awq` tests the fused prefix itself (`...qkv_proj`)."""
        shards = fused_shards(unit, self.naming) if self.engine == "vllm" else None
        if not shards:
            return entries.hit(unit), ()
        hits = [entries.hit(s) for s in shards]
        if any(hits) and not all(hits):
            return None, tuple(s for s, h in zip(shards, hits) if h)
        return hits[0], ()

    def _moe(self, unit: str, cls: "ModClass") -> tuple[bool, str, str, tuple[str, ...]]:
        rep = cls.rep
        inter = rep.in_features if rep.role == "down" else rep.out_features
        ok, why = marlin_moe_supported(self.hidden, inter, self.p.group_size)
        if not self.p.marlin_compatible or not ok:
            # both engines fall back to MoeWNA16Config.from_config(full_config): gptq -> no exclusions,
            # awq -> the config's modules_to_not_convert (substring), never the derived list
            reason = why or f"{self.p.engine_method()} has no MoE kernel"
            entries, what = (SubstringIndex(()), "dynamic (ignored)") if self.p.method == GPTQ else \
                self.awq_not_convert(derive=False)
            hit = entries.hit(unit)
            if hit:
                return False, f"moe_wna16 fallback ({reason}): {what} entry {hit!r}", "unquantized", ()
            return True, f"moe_wna16 fallback ({reason}) ignores `dynamic` and derived lists", "moe_wna16", ()
        if self.engine != "vllm":    # SGLang gptq.py / awq.py: the Marlin FusedMoE method, no exclusion
            return True, "SGLang builds every Marlin FusedMoE quantized (no exclusion for MoE layers)", \
                f"{self.p.method}_marlin", ()
        if self.p.method == GPTQ:
            rule = self.p.skipped_by_dynamic(unit)
            if rule is not None:
                return False, f"dynamic rule {rule.raw!r} matches the FusedMoE prefix", "unquantized", ()
            leaf = next((r for r in self.p.dynamic if r.negative and r.matches(f"{unit}.0.gate_proj")), None)
            note = f"; rule {leaf.raw!r} matches per-expert names, never the FusedMoE prefix" if leaf else ""
            return True, "only a dynamic `-:` rule matching the FusedMoE prefix excludes it" + note, \
                "gptq_marlin", ()
        entries, what = self.awq_not_convert(derive=True)
        hit = entries.hit(unit)
        if hit:
            return False, f"{what} entry {hit!r} is a substring of the FusedMoE prefix", "unquantized", ()
        return True, f"no {what} entry is a substring of the FusedMoE prefix", "awq_marlin", ()


def _hidden(ctx: "Context") -> int | None:
    config = ctx.view.config or {}
    scopes = [config] + [config[k] for k in ("text_config",) if isinstance(config.get(k), dict)]
    for scope in reversed(scopes):
        value = scope.get("hidden_size")
        if isinstance(value, int):
            return value
    return None
