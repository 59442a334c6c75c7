"""The validation report: findings (folded), a verdict per engine, and a module summary.

`validate(target)` opens a checkpoint (local or Hub), lays it out, parses its quantization config,
runs every rule for the requested engines and returns a `Report`; `Report.to_dict()` is the
`quantgate validate --format json` object (the CLI contract of issue 2).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from quantgate.validators.engine_facts import NEWEST, resolve_versions
from quantgate.validators.findings import ENGINES, Finding, Severity, VerdictStatus
from quantgate.validators.grouping import fold_names

if TYPE_CHECKING:
    from quantgate.validators.checkpoint import CheckpointView
    from quantgate.validators.deployment import Deployment

log = logging.getLogger(__name__)

REPORT_VERSION = 1
SEVERITY_ORDER = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
#: module states in the summary and the HTML picture
STATES: tuple[str, ...] = ("quantized", "excluded", "bf16_not_excluded", "unquantized")


@dataclass(frozen=True, slots=True)
class ModuleRow:
    """One module for the summary and the HTML grid."""

    name: str
    kind: str
    layer: int | None
    expert: int | None
    state: str                  # quantized | excluded | bf16_not_excluded | unquantized
    scheme: str | None
    error: bool = False         # named by an error finding


@dataclass
class Report:
    target: str
    quantized: bool
    dialect: str | None
    scheme: str | None
    findings: list[Finding]
    verdicts: dict[str, dict]           # engine -> {"status": loads|fails|loads_wrong|unknown, "reason": str}
    summary: dict
    engines: tuple[str, ...] = ENGINES
    deep: bool = True
    engine_versions: dict[str, str] = field(default_factory=dict)   # engine -> release the verdict holds for
    deployment: dict | None = None      # {"tensor_parallel_size", "expert_parallel"} when given
    rows: Callable[[], list[ModuleRow]] | None = field(default=None, repr=False)   # built on demand

    @property
    def modules(self) -> list[ModuleRow]:
        """One row per module (for the HTML picture); computed on first use, 45k rows cost ~0.1 s."""
        cached = self.__dict__.get("_modules")
        if cached is None:
            cached = self.__dict__["_modules"] = self.rows() if self.rows else []
        return cached

    @property
    def ok(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def unknown_engines(self) -> list[str]:
        """Engines whose outcome quantgate does not predict (verdict `unknown`)."""
        return [e for e, v in self.verdicts.items() if v.get("status") == VerdictStatus.UNKNOWN.value]

    def strict_ok(self) -> bool:
        """`--strict`: no error, no warning, and a prediction for every engine."""
        return self.ok and not self.unknown_engines and not any(f.severity is Severity.WARNING for f in self.findings)

    def counts(self) -> dict[str, int]:
        c = Counter(f.severity.value for f in self.findings)
        return {s.value: c.get(s.value, 0) for s in Severity}

    def to_dict(self) -> dict:
        return {
            "version": quantgate_version(),
            "report_version": REPORT_VERSION,
            "target": self.target,
            "ok": self.ok,
            "quantized": self.quantized,
            "dialect": self.dialect,
            "scheme": self.scheme,
            "engines": list(self.engines),
            "deep": self.deep,
            "engine_versions": dict(self.engine_versions),
            "deployment": self.deployment,
            "verdicts": self.verdicts,
            "unknown_engines": self.unknown_engines,       # verdict `unknown`: a format not modelled
            "counts": self.counts(),
            "findings": [finding_dict(f) for f in self.findings],
            "summary": self.summary,
        }


def quantgate_version() -> str:
    """The quantgate version (`quantgate.validators.__version__`, kept equal to pyproject.toml's)."""
    from quantgate.validators import __version__

    return __version__


def finding_dict(f: Finding) -> dict:
    d = f.to_dict()
    d["modules"] = fold_names(f.modules)
    d["module_count"] = len(f.modules)
    return d


def verdicts(findings: Sequence[Finding], engines: Sequence[str], quantized: bool,
             versions: Mapping[str, str] | None = None) -> dict[str, dict]:
    """Per engine: `fails` if any finding says so (the first such error), else `loads_wrong`, else
    `unknown` when a finding says quantgate does not model what the engine does, else `loads`.

    A known failure outranks `unknown`: a corrupt header fails whatever the format. Every verdict
    carries a `reason`, the `codes` behind it and the engine release it holds for (`engine_version`)."""
    out = _verdicts(findings, engines, quantized)
    for engine, v in out.items():
        v["engine_version"] = (versions or {}).get(engine) or NEWEST.get(engine)
    return out


def _verdicts(findings: Sequence[Finding], engines: Sequence[str], quantized: bool) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for engine in engines:
        mine = [f for f in findings if engine in f.engines]
        fails = [f for f in mine if f.effect is VerdictStatus.FAILS]
        wrong = [f for f in mine if f.effect is VerdictStatus.LOADS_WRONG]
        unknown = [f for f in mine if f.effect is VerdictStatus.UNKNOWN]
        if fails:
            f = fails[0]
            out[engine] = {"status": VerdictStatus.FAILS.value,
                           "reason": f"{f.code}: {f.predicted_error or f.message}", "codes": _codes(fails)}
        elif wrong:
            f = wrong[0]
            out[engine] = {"status": VerdictStatus.LOADS_WRONG.value,
                           "reason": f"{f.code}: {f.predicted_error or f.message}", "codes": _codes(wrong)}
        elif unknown:
            f = unknown[0]
            out[engine] = {"status": VerdictStatus.UNKNOWN.value,
                           "reason": f"{f.code}: {f.message}", "codes": _codes(unknown)}
        else:
            reason = "no finding predicts a load failure or silent corruption" if quantized else \
                "unquantized checkpoint: loads as a plain model"
            out[engine] = {"status": VerdictStatus.LOADS.value, "reason": reason, "codes": []}
    return out


def _codes(findings: Sequence[Finding]) -> list[str]:
    return sorted({f.code for f in findings})


def _module_rows(ctx, findings: Sequence[Finding]) -> list[ModuleRow]:
    from quantgate.validators.rules._context import BF16, QUANTIZED

    a = ctx.analysis
    covs = [a.coverage(e) for e in ctx.engines] if a.active else []
    errored = {n for f in findings if f.severity is Severity.ERROR for n in f.modules}
    rows: list[ModuleRow] = []
    for i, cls in enumerate(a.classes):
        state = _class_state(a, cls, i, covs, BF16, QUANTIZED)
        scheme = cls.state.scheme.name if cls.state.scheme else None
        rows.extend(ModuleRow(m.name, cls.kind, m.layer, m.expert, state, scheme, m.name in errored)
                    for m in cls.members)
    return rows


def summarize(ctx, view: "CheckpointView") -> dict:
    """Modules by kind x state, counted per module class (no per-module work)."""
    from quantgate.validators.rules._context import BF16, QUANTIZED

    a = ctx.analysis
    covs = [a.coverage(e) for e in ctx.engines] if a.active else []
    by_kind: dict[str, dict[str, int]] = defaultdict(lambda: {s: 0 for s in STATES})
    total = 0
    for i, cls in enumerate(a.classes):
        by_kind[cls.kind][_class_state(a, cls, i, covs, BF16, QUANTIZED)] += len(cls.members)
        total += len(cls.members)
    totals = {s: sum(k[s] for k in by_kind.values()) for s in STATES}
    return {"modules": total, "tensors": len(view.tensors), "files": len(view.files),
            "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())}, "totals": totals}


def _class_state(a, cls, i: int, covs: list, bf16: str, quantized: str) -> str:
    if cls.state.state == quantized:
        return "quantized"
    if not a.active:
        return "unquantized"
    if cls.state.state == bf16 and any(not cov[i].excluded for cov in covs):
        return "bf16_not_excluded"
    return "excluded"


def _scheme_name(ctx) -> str | None:
    qc = ctx.qc
    if qc is not None and qc.is_modelopt and qc.quant_algo:
        return qc.quant_algo
    names = Counter({c.state.scheme.name: 0 for c in ctx.analysis.quantized_classes if c.state.scheme})
    for c in ctx.analysis.quantized_classes:
        if c.state.scheme:
            names[c.state.scheme.name] += len(c.members)
    if names:
        return names.most_common(1)[0][0]
    return qc.ct_format if qc is not None else None


def sort_findings(findings: list[Finding]) -> list[Finding]:
    return sorted(findings, key=lambda f: (SEVERITY_ORDER[f.severity], f.code, f.message))


def validate_view(view: "CheckpointView", *, engines: Sequence[str] = ENGINES, deep: bool = True,
                  engine_versions: Mapping[str, str] | None = None,
                  deployment: "Deployment | None" = None) -> Report:
    """Run every rule over an opened checkpoint, for the given engine releases (default: the newest
    `engine_facts` was read from) and, when given, the serving shape (tensor / expert parallel)."""
    from quantgate.validators.layout import build_layout
    from quantgate.validators.quant_config import parse_quant_config
    from quantgate.validators.rules import Context, run_rules
    from quantgate.validators.rules._context import Analysis

    engines = tuple(e for e in ENGINES if e in engines)
    versions = resolve_versions(engine_versions)
    qc, qc_findings = parse_quant_config(view.config, view.hf_quant_config)
    layout = build_layout(view.tensors, view.config)
    ctx = Context(view=view, layout=layout, qc=qc, engines=engines, deep=deep, qc_findings=qc_findings,
                  engine_versions=versions, deployment=deployment)
    ctx.analysis = Analysis(ctx)
    findings = sort_findings(run_rules(ctx))
    quantized = ctx.analysis.is_quantized or qc is not None
    return Report(target=view.target, quantized=quantized, dialect=qc.dialect if qc else
                  (ctx.analysis.dialect if ctx.analysis.is_quantized else None),
                  scheme=_scheme_name(ctx), findings=findings,
                  verdicts=verdicts(findings, engines, quantized, versions), summary=summarize(ctx, view),
                  engines=engines, deep=deep, rows=lambda: _module_rows(ctx, findings),
                  engine_versions={e: versions[e] for e in engines},
                  deployment=deployment.to_dict() if deployment is not None else None)


def validate(target: str, *, engines: Sequence[str] = ENGINES, deep: bool | None = None,
             revision: str | None = None, token: str | None = None,
             engine_versions: Mapping[str, str] | None = None, deployment: "Deployment | None" = None) -> Report:
    """Open `target` (directory, .safetensors file, `org/name`, `hf://org/name@rev`) and validate it.

    `deep=None` reads scale values for local checkpoints and skips them for the Hub (no downloads).
    `engine_versions` ({"vllm": "0.10.2"}) picks engine releases; `deployment` the serving shape.
    """
    from quantgate.validators.checkpoint import open_checkpoint
    from quantgate.validators.errors import CheckpointReadError
    from quantgate.validators.safetensors_header import gc_paused

    view = open_checkpoint(target, revision=revision, token=token)
    if not view.tensors:
        reason = view.problems[0].message if view.problems else "no tensors"
        raise CheckpointReadError(f"{target}: nothing readable ({reason})")
    if deep is None:
        deep = view.kind != "hub"
    with gc_paused():       # 180k header objects: generational GC passes would dominate the run
        return validate_view(view, engines=engines, deep=deep, engine_versions=engine_versions,
                             deployment=deployment)
