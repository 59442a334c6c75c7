"""Rule registry and the shared, lazily computed context every rule reads.

A rule is a small function decorated with `@rule(code, name, severity, engines)`; its docstring
has three paragraphs, What / Why (the vllm_sglang.md §10 invariant and the real failure) / Fix,
and is the rule's documentation (`quantgate validate --explain` style tools and the HTML report
show it). Codes are stable and never reused. Per-engine rules run once per requested engine with
`ctx.engine` set; engine-agnostic ones (`per_engine=False`) run once.

Themes: config.py QG1xx, coverage.py QG2xx (mixed.py QG21x: MIXED_PRECISION maps), tensors.py QG3xx,
moe.py QG4xx, scales.py QG5xx, integrity.py QG6xx, namespace.py QG701 (tensor names in the model's
name space), deployment.py QG71x (tensor / expert parallel shapes); dialects.py (QG190: a format not
modelled), fp8.py (QG320: native fp8 block alignment), wna16*.py / mxfp4.py / block_scales.py (gptq, awq,
mxfp4), lm_head.py (QG218).

Honest uncertainty: when the config's quant_method or compressed-tensors format is not modelled
(`format_support.is_modelled`), only the format-independent rules (`FORMAT_INDEPENDENT`: files, headers,
the index, and QG190 itself) run; no rule written for another dialect judges its tensors, and QG190
makes every verdict `unknown`.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from quantgate.validators.findings import ENGINES, Finding, Severity

if TYPE_CHECKING:
    from quantgate.validators.checkpoint import CheckpointView
    from quantgate.validators.deployment import Deployment
    from quantgate.validators.layout import Layout
    from quantgate.validators.quant_config import QuantConfig
    from quantgate.validators.rules._context import Analysis

log = logging.getLogger(__name__)

RULE_MODULES: tuple[str, ...] = ("config", "coverage", "mixed", "tensors", "moe", "scales", "integrity",
                                  "dialects", "fp8", "wna16", "wna16_tensors", "mxfp4", "block_scales", "lm_head",
                                  "namespace", "deployment")
#: rules about files rather than a quantization format: they also run for a format not modelled
FORMAT_INDEPENDENT: frozenset[str] = frozenset({"QG190", "QG601", "QG602", "QG603", "QG604", "QG605", "QG606",
                                                "QG607"})


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: Severity
    engines: tuple[str, ...]
    check: Callable[["Context"], Iterable[Finding]]
    doc: str
    per_engine: bool = True
    deep: bool = False              # reads scale values (QG5xx, gate/up global scales)

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name


RULES: dict[str, Rule] = {}


def rule(code: str, name: str, severity: Severity, engines: tuple[str, ...] = ENGINES, *,
         per_engine: bool = True, deep: bool = False) -> Callable:
    """Register `check(ctx) -> Iterable[Finding]` under a stable code."""

    def decorator(check: Callable[["Context"], Iterable[Finding]]) -> Callable:
        if code in RULES:
            raise ValueError(f"rule code {code} registered twice")
        RULES[code] = Rule(code=code, name=name, severity=severity, engines=engines, check=check,
                           doc=check.__doc__ or "", per_engine=per_engine, deep=deep)
        return check

    return decorator


@dataclass
class Context:
    """What a rule sees. `analysis` holds the cached derived facts (module states, engine coverage)."""

    view: "CheckpointView"
    layout: "Layout"
    qc: "QuantConfig | None"
    engines: tuple[str, ...]
    deep: bool
    qc_findings: list[Finding] = field(default_factory=list)
    engine: str | None = None
    analysis: "Analysis | None" = None
    engine_versions: dict[str, str] = field(default_factory=dict)   # engine -> release (engine_facts.NEWEST)
    deployment: "Deployment | None" = None                          # --tensor-parallel-size / --expert-parallel

    @property
    def engine_version(self) -> str | None:
        """The release of `engine` the facts are looked up for (None: engine_facts' newest)."""
        return self.engine_versions.get(self.engine) if self.engine else None

    def for_engine(self, engine: str | None) -> "Context":
        return replace(self, engine=engine)

    @property
    def a(self) -> "Analysis":
        assert self.analysis is not None
        return self.analysis


def load_rules() -> dict[str, Rule]:
    for mod in RULE_MODULES:
        importlib.import_module(f"quantgate.validators.rules.{mod}")
    return RULES


def run_rules(ctx: Context, *, codes: Iterable[str] | None = None) -> list[Finding]:
    """Run every registered rule (or `codes`) for the requested engines; merge identical findings
    that several engines produced into one naming all of them."""
    from quantgate.validators.rules._context import Analysis

    load_rules()
    if ctx.analysis is None:
        ctx.analysis = Analysis(ctx)
    from quantgate.validators.format_support import is_modelled

    selected = [RULES[c] for c in sorted(RULES) if codes is None or c in set(codes)]
    if not is_modelled(ctx.qc):
        selected = [r for r in selected if r.code in FORMAT_INDEPENDENT]
    raw: list[Finding] = []
    for r in selected:
        if r.deep and not ctx.deep:
            continue
        engines = tuple(e for e in ctx.engines if e in r.engines)
        if not engines:
            continue
        runs = [ctx.for_engine(e) for e in engines] if r.per_engine else [ctx.for_engine(None)]
        start = time.perf_counter()
        for sub in runs:
            for f in r.check(sub):
                scope = (sub.engine,) if sub.engine else tuple(e for e in f.engines if e in engines) or engines
                raw.append(replace(f, engines=scope))
        log.debug("rule %s took %.1f ms", r.code, (time.perf_counter() - start) * 1e3)
    return merge_engines(raw)


def merge_engines(findings: list[Finding]) -> list[Finding]:
    """Findings equal except for `engines` become one finding listing all their engines."""
    merged: dict[tuple, Finding] = {}
    for f in findings:
        key = (f.code, f.severity, f.message, f.modules, f.fix, f.effect, f.predicted_error)
        if key in merged:
            prev = merged[key]
            merged[key] = replace(prev, engines=tuple(dict.fromkeys(prev.engines + f.engines)))
        else:
            merged[key] = f
    return list(merged.values())
