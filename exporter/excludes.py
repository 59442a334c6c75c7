"""Synthesis of `exclude_modules` patterns that the engines resolve to exactly the excluded modules.

ModelOpt 0.47 (`_prefix_wildcard_summarize_exclude_modules`, reference modelopt.md §1.3) replaces
each unquantized module name by the shortest dot-boundary prefix wildcard (`model.layers.0.router*`)
that matches no quantized module, or keeps the exact name. It checks that with fnmatch on HF names
only; vLLM and SGLang match in their own name spaces (substring, fnmatch after the `x*` split, the
expert-substring rule, prefix maps, Gemma4 `experts` -> `moe.experts`; vllm_sglang.md §2, §8, §10).

We generate the same prefix candidates first, then leading wildcards (`*layers.0.self_attn*`) that
survive an engine's prefix map (SGLang does not map `model.language_model.` patterns), and the exact
name last (an exact fused shard conflicts with its unlisted siblings in vLLM), and accept a candidate only when `quantgate.validators.engines` proves, for every engine, that it
matches no quantized module. Every excluded module must end up excluded in every engine; a final
pass folds per-layer patterns (`model.layers.3.mlp.gate`) into one layer wildcard
(`model.layers.*.mlp.gate`) when that is still safe.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from quantgate.validators.engines import ENGINE_SEMANTICS, EngineSemantics, engine_unit, fused_shards, naming_for
from quantgate.validators.engines import _Base as _EngineBase

log = logging.getLogger(__name__)

_NUMERIC = re.compile(r"^\d+$")


@dataclass
class ExcludeSynthesis:
    """The synthesized pattern list and anything that could not be made exact."""

    patterns: list[str]
    uncovered: dict[str, list[str]] = field(default_factory=dict)   # engine -> excluded modules it misses
    overreach: dict[str, list[str]] = field(default_factory=dict)   # engine -> quantized modules matched


def candidates(module: str, *, exact_early: bool = True) -> list[str]:
    """Patterns that may exclude `module`, most compact first (ModelOpt's order, then our extras).

    `exact_early=False` for fused-group members: an exact shard name (`...q_proj`) must never be
    listed without its siblings, so it is only the last resort.
    """
    parts = module.split(".")
    out = [".".join(parts[:k]) + "*" for k in range(1, len(parts))]          # ModelOpt: `prefix*`
    if exact_early:
        out.append(module)                                                   # ModelOpt: exact name
    out += [f"*{'.'.join(parts[i:j])}*" for j in range(2, len(parts) + 1)   # survive prefix maps:
            for i in range(1, j) if not _NUMERIC.match(parts[i])]            # `*layers.0.self_attn*`
    out += [f"*{'.'.join(parts[i:])}" for i in range(1, len(parts))        # no trailing `*`: SGLang's
            if not _NUMERIC.match(parts[i])]                                 # regex would reach `gate_up_proj`
    out += [f"*{'.'.join(parts[i:j])}.*{parts[k]}*" for j in range(2, len(parts))   # bridge engine-only
            for i in range(1, j) if not _NUMERIC.match(parts[i])                     # segments: Gemma4
            for k in range(j, len(parts)) if not _NUMERIC.match(parts[k])]          # `layers.1.*experts*`
    if not exact_early:
        out.append(module)
    return out


class _Checker:
    """Decides, per engine, whether a single pattern would exclude any quantized module.

    Checking each candidate against every quantized module is O(candidates x modules): minutes for
    DeepSeek-V3's ~45k quantized modules. Two exact reductions make it cheap, without changing a
    single answer:

    1. Equivalence classes. The engines decide on a module's engine *unit* (`engines.engine_unit`:
       the FusedMoE layer for a routed expert, the fused linear for a q/k/v shard), and look at the
       module's own engine name only when a fused shard conflicts. So all modules with the same
       unit, and (for fused units) the same engine name, get the same answer: one representative
       per class is checked (a DeepSeek-V3 layer's 768 routed experts are one class).
    2. A literal prefilter. Every way an engine can match a pattern `p` (exact name, substring,
       fnmatch, SGLang's regex on the name or one segment, MLA tails) needs the longest `*`-free
       piece of `p` (after the engine's own pattern rewriting) to occur in the unit; the two others
       are the expert rule (the unit occurs in `p`) and a fused shard listed by name (`p` is a
       shard of the unit). Only classes passing that test are checked with the engine itself.

    Engines not built on `quantgate.validators.engines` (test doubles) fall back to the full check.
    """

    def __init__(self, quantized: Sequence[str], architecture: str | None,
                 engines: Mapping[str, EngineSemantics]) -> None:
        self.quantized = list(quantized)
        self.architecture = architecture
        self.engines = engines
        self._safe: dict[str, bool] = {}
        self._classes = {name: _classes(sem, self.quantized, architecture) for name, sem in engines.items()}

    def safe(self, pattern: str) -> bool:
        """True when `pattern` excludes no quantized module in any engine."""
        if pattern not in self._safe:
            self._safe[pattern] = not any(self.hits(engine, [pattern], first_only=True) for engine in self.engines)
        return self._safe[pattern]

    def hits(self, engine: str, patterns: Sequence[str], *, first_only: bool = False) -> list[str]:
        """Quantized modules that `patterns` exclude in `engine` (with `first_only`, at most one)."""
        sem = self.engines[engine]
        classes = self._classes[engine]
        if classes is None:
            found: list[str] = []
            for q in self.quantized:
                if sem.is_excluded(q, patterns, self.architecture):
                    found.append(q)
                    if first_only:
                        break
            return found
        literals = _literals(sem, patterns, self.architecture)
        out: list[str] = []
        for cls in classes:
            if literals is not None and not cls.may_match(literals):
                continue
            if sem.is_excluded(cls.members[0], patterns, self.architecture):
                if first_only:
                    return [cls.members[0]]
                out.extend(cls.members)
        return out

    def covers(self, module: str, patterns: Sequence[str], engine: str) -> bool:
        return self.engines[engine].is_excluded(module, patterns, self.architecture)


@dataclass
class _Class:
    """Quantized modules an engine cannot tell apart (same unit, same name where shards matter)."""

    unit: str
    shards: frozenset[str]          # the unit's fused shard names (engine space), empty when unfused
    members: list[str] = field(default_factory=list)

    def may_match(self, literals: tuple[tuple[str, str], ...]) -> bool:
        """False only when no engine matching mode can hit this unit (see `_Checker`)."""
        for pattern, longest in literals:
            if longest in self.unit or pattern in self.shards:
                return True
            if "experts" in pattern and "experts" in self.unit and self.unit in pattern:
                return True
        return False


def _classes(sem: EngineSemantics, quantized: Sequence[str], architecture: str | None) -> list[_Class] | None:
    """Equivalence classes of `quantized` for `sem`, or None when `sem` is not a `quantgate.validators.engines` engine."""
    if not isinstance(sem, _EngineBase):
        return None
    naming = naming_for(architecture)
    classes: dict[tuple[str, str | None], _Class] = {}
    for module in quantized:
        name = sem.engine_name(module, architecture)
        unit = engine_unit(name, naming)
        shards = fused_shards(unit, naming)
        key = (unit, name if shards is not None else None)
        if key not in classes:
            classes[key] = _Class(unit, frozenset(shards or ()))
        classes[key].members.append(module)
    return list(classes.values())


def _literals(sem: EngineSemantics, patterns: Sequence[str], architecture: str | None
              ) -> tuple[tuple[str, str], ...] | None:
    """(engine pattern, its longest `*`-free piece) for the prefilter; None when a pattern has
    fnmatch classes (`?`, `[`) or no literal at all, so that the prefilter must not be used."""
    out = []
    for pattern in sem.engine_patterns(patterns, architecture):
        if "?" in pattern or "[" in pattern:
            return None
        longest = max(pattern.split("*"), key=len)
        if not longest:
            return None
        out.append((pattern, longest))
    return tuple(out)


def synthesize_excludes(excluded: Sequence[str], quantized: Sequence[str], architecture: str | None, *,
                        always: Sequence[str] = (), fused_members: Collection[str] = (),
                        engines: Mapping[str, EngineSemantics] = ENGINE_SEMANTICS) -> ExcludeSynthesis:
    """Compact exclude patterns for `excluded` that hit none of `quantized`, proven per engine.

    `always` are entries written verbatim first (e.g. `lm_head` of a tied model, which has no tensor
    but is still a module the engines consult). `fused_members` are modules the engines fuse with
    siblings (q/k/v, gate/up): their exact names are tried last.
    """
    fused = set(fused_members)
    checker = _Checker(quantized, architecture, engines)
    chosen: list[str] = [p for p in always]
    for module in sorted(excluded):
        missing = [e for e in engines if not checker.covers(module, chosen, e)]
        if not missing:
            continue
        options = candidates(module, exact_early=module not in fused)
        pick = _first_exact(options, checker, module, chosen, missing)
        if pick is not None:
            chosen.append(pick)
            continue
        for engine in missing:   # no single pattern serves every engine: one per engine
            if not checker.covers(module, chosen, engine):
                pick = _first_exact(options, checker, module, chosen, [engine])
                chosen.append(pick if pick is not None else module)
    chosen = _fold_layers(chosen, checker, excluded)
    result = ExcludeSynthesis(patterns=_dedupe_sorted(chosen))
    for engine, sem in engines.items():
        missed = [m for m in excluded if not sem.is_excluded(m, result.patterns, architecture)]
        hit = checker.hits(engine, result.patterns)
        if missed:
            result.uncovered[engine] = missed
        if hit:
            result.overreach[engine] = hit
    if result.uncovered or result.overreach:
        log.warning("exclude patterns are not exact: uncovered=%s overreach=%s",
                    {k: len(v) for k, v in result.uncovered.items()},
                    {k: len(v) for k, v in result.overreach.items()})
    return result


def _first_exact(options: Iterable[str], checker: _Checker, module: str, chosen: Sequence[str],
                 engines: Sequence[str]) -> str | None:
    """The first option that hits no quantized module and, added to `chosen`, excludes `module` in
    every one of `engines`."""
    for option in options:
        if checker.safe(option) and all(checker.covers(module, [*chosen, option], e) for e in engines):
            return option
    return None


def _fold_layers(patterns: list[str], checker: _Checker, excluded: Sequence[str]) -> list[str]:
    """Replace patterns differing only in one numeric segment by one `*` pattern when still exact.

    Only folds groups of two or more: `model.layers.0.router*` + `model.layers.1.router*` ->
    `model.layers.*.router*`. The folded pattern must be safe in every engine, and every excluded
    module must stay excluded: vLLM's substring rule lets `model.layers.0.mlp.shared_expert*` cover
    `...shared_expert_gate`, which the wildcard form no longer does.
    """
    groups: dict[str, list[str]] = {}
    for p in patterns:
        segments = p.split(".")
        for i, seg in enumerate(segments):
            if _NUMERIC.match(seg):
                key = ".".join([*segments[:i], "*", *segments[i + 1:]])
                groups.setdefault(key, []).append(p)
                break
    current = list(patterns)
    for key, members in groups.items():
        if len(members) < 2 or not checker.safe(key):
            continue
        trial = [p for p in current if p not in members] + [key]
        if all(checker.covers(m, trial, e) for m in excluded for e in checker.engines
               if checker.covers(m, current, e)):
            current = trial
    return current


def _dedupe_sorted(patterns: Iterable[str]) -> list[str]:
    return sorted(dict.fromkeys(patterns))
