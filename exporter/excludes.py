"""Synthesis of `exclude_modules` patterns that the engines resolve to exactly the excluded modules.

ModelOpt 0.47 (`_prefix_wildcard_summarize_exclude_modules`, reference modelopt.md §1.3) replaces
each unquantized module name by the shortest dot-boundary prefix wildcard (`model.layers.0.router*`)
that matches no quantized module, or keeps the exact name. It checks that with fnmatch on HF names
only; vLLM and SGLang match in their own name spaces (substring, fnmatch after the `x*` split, the
expert-substring rule, prefix maps, Gemma4 `experts` -> `moe.experts`; vllm_sglang.md §2, §8, §10).

We generate the same prefix candidates first, then leading wildcards (`*layers.0.self_attn*`) that
survive an engine's prefix map (SGLang does not map `model.language_model.` patterns), and the exact
name last (an exact fused shard conflicts with its unlisted siblings in vLLM), and accept a candidate only when `validators.engines` proves, for every engine, that it
matches no quantized module. Every excluded module must end up excluded in every engine; a final
pass folds per-layer patterns (`model.layers.3.mlp.gate`) into one layer wildcard
(`model.layers.*.mlp.gate`) when that is still safe.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from validators.engines import ENGINE_SEMANTICS, EngineSemantics

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
    """Caches, per engine, which quantized modules a single pattern would exclude."""

    def __init__(self, quantized: Sequence[str], architecture: str | None,
                 engines: Mapping[str, EngineSemantics]) -> None:
        self.quantized = list(quantized)
        self.architecture = architecture
        self.engines = engines
        self._safe: dict[str, bool] = {}

    def safe(self, pattern: str) -> bool:
        """True when `pattern` excludes no quantized module in any engine."""
        if pattern not in self._safe:
            self._safe[pattern] = not any(
                sem.is_excluded(q, [pattern], self.architecture)
                for sem in self.engines.values() for q in self.quantized)
        return self._safe[pattern]

    def covers(self, module: str, patterns: Sequence[str], engine: str) -> bool:
        return self.engines[engine].is_excluded(module, patterns, self.architecture)


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
        hit = [q for q in quantized if sem.is_excluded(q, result.patterns, architecture)]
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
