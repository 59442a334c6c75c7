"""`auto` recipe: per-group mixed precision under an effective-bits budget.

    plan_auto(source, bits=6.0, candidates=("nvfp4", "fp8"), method="gradient") -> AutoPlan
    to_plan(auto_plan, layout) -> exporter.recipes.Plan        (recipe "auto", mixed schemes)

Steps: decision groups from the layout (`groups.py`); scores per group and candidate, measured on
the real model (`scoring.py`) or read back from a scores file; the exact integer program
(`optimize.py`) picks one scheme per group. With `scores_file`, an existing file is reused (after
checking it belongs to this model and covers the candidates and method): re-planning at another
budget then runs no forward pass and does not even load the model; a missing file is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantgate.exporter.auto.groups import BF16, DecisionGroup, candidate_specs, decision_groups, is_quantizable
from quantgate.exporter.auto.optimize import Selection, select
from quantgate.exporter.auto.scores_file import ScoreTable, fingerprint
from quantgate.exporter.auto.scoring import check_method, score_groups
from quantgate.exporter.progress import ProgressCallback, emit
from quantgate.exporter.recipes import ALWAYS_EXCLUDED_REASON, DECODER_LINEAR_KINDS, DIALECT, Assignment, Plan
from quantgate.validators.layout import Layout
from quantgate.validators.schemes import scheme

log = logging.getLogger(__name__)

RECIPE = "auto"
DEFAULT_CANDIDATES: tuple[str, ...] = ("nvfp4", "fp8")
DEFAULT_METHOD = "gradient"  # ModelOpt's default too
DEFAULT_SCORE_SAMPLES = 128  # ModelOpt's --auto_quantize_score_size
DEFAULT_SCORE_SEQ_LEN = 512
DEFAULT_SCORE_BATCH_SIZE = 1  # per-sequence gradients: the Fisher estimate `gradient` wants


@dataclass
class AutoPlan:
    """The outcome of `plan_auto`: a scheme per decision group and per module, and the bits reached."""

    budget: float
    effective_bits: float
    method: str
    candidates: tuple[str, ...]  # scheme names considered (BF16 implied)
    groups: list[DecisionGroup]
    choice: dict[str, str]  # group key -> scheme name or "BF16"
    schemes: dict[str, str | None]  # quantizable module -> scheme name, None = BF16
    total_score: float
    optimal: bool
    scores: ScoreTable
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """What the export report states: budget, achieved bits, numel and modules per scheme."""
        by_scheme: dict[str, dict[str, int]] = {}
        for group in self.groups:
            entry = by_scheme.setdefault(self.choice[group.key], {"groups": 0, "modules": 0, "numel": 0})
            entry["groups"] += 1
            entry["modules"] += len(group.modules)
            entry["numel"] += group.numel
        return {
            "recipe": RECIPE,
            "bits_budget": self.budget,
            "effective_bits": round(self.effective_bits, 6),
            "method": self.method,
            "candidates": [*self.candidates, BF16],
            "optimal": self.optimal,
            "total_score": self.total_score,
            "by_scheme": dict(sorted(by_scheme.items())),
            "groups": {g.key: self.choice[g.key] for g in self.groups},
        }


def plan_auto(
    source: Any,
    bits: float,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    *,
    method: str = DEFAULT_METHOD,
    score_samples: int = DEFAULT_SCORE_SAMPLES,
    score_seq_len: int = DEFAULT_SCORE_SEQ_LEN,
    score_batch_size: int = DEFAULT_SCORE_BATCH_SIZE,
    scores_file: Path | str | None = None,
    data: str = "random",
    seed: int = 0,
    device: str = "auto",
    exclude: Sequence[str] = (),
    model: Any | None = None,
    token: str | None = None,
    revision: str | None = None,
    progress: ProgressCallback | None = None,
    session: Any | None = None,
) -> AutoPlan:
    """Plan `source` (an exporter Source or a model directory / Hub id) at `bits` effective bits.

    `model`: an already loaded transformers model of `source` to score with (else loaded here, only
    when scores must be computed). `session`: an `quantgate.exporter.calibration.session.ModelSession` to take the
    model from instead, so that calibration afterwards reuses the same load (the pipeline's way).
    `data`/`seed`/`score_*`: the scoring tokens, as calibration data.
    """
    src = _open(source, revision, token)
    check_method(method)
    specs = candidate_specs(candidates)
    groups = decision_groups(src.layout, specs, exclude)
    names = [s.name for s in specs]
    path = Path(scores_file) if scores_file is not None else None
    if path is not None and path.exists():
        table = ScoreTable.load(path)
        table.check_model(fingerprint(src.view.config, src.view.tensors), origin=str(path))
        table.check_covers(groups, names, method, origin=str(path))
        log.info("auto: reusing scores from %s (no forward pass)", path)
    else:
        setup = ScoringSetup(method, score_samples, score_seq_len, score_batch_size, data, seed, device)
        table = _score(
            src, groups, names, setup, model=model, token=token, revision=revision, progress=progress,
            session=session,
        )
        if path is not None:
            table.save(path)
            log.info("auto: scores saved to %s", path)
    selection = select(groups, table.scores, bits)
    plan = _auto_plan(selection, groups, names, method, table)
    emit(
        progress,
        "plan",
        1.0,
        f"auto: {plan.effective_bits:.3f} effective bits (budget {bits:g})",
        **plan.summary(),
    )
    return plan


def _open(source: Any, revision: str | None, token: str | None) -> Any:
    if hasattr(source, "layout") and hasattr(source, "view"):
        return source
    from quantgate.exporter.source import open_source

    return open_source(str(source), revision=revision, token=token)


@dataclass(frozen=True)
class ScoringSetup:
    """How scores are measured: method, scoring tokens (as calibration data) and device."""

    method: str
    samples: int
    seq_len: int
    batch_size: int
    data: str
    seed: int
    device: str


def _score(
    src: Any,
    groups: list[DecisionGroup],
    names: list[str],
    setup: ScoringSetup,
    *,
    model: Any | None,
    token: str | None,
    revision: str | None,
    progress: ProgressCallback | None,
    session: Any | None = None,
) -> ScoreTable:
    from quantgate.exporter.calibration.session import ModelSession, ModelState, check_untouched

    model_ref = str(src.path)
    start = time.perf_counter()
    if session is None:
        session = ModelSession(model_ref, device=setup.device, token=token, revision=revision, model=model)
    model = session.model()
    prepared = session.batches(
        setup.data, samples=setup.samples, seq_len=setup.seq_len, batch_size=setup.batch_size, seed=setup.seed
    )
    before = ModelState.of(model)
    scores = score_groups(
        model, src.layout, groups, prepared.batches, method=setup.method, source=src, progress=progress
    )
    check_untouched(model, before)   # calibration may run on this very model next
    metadata = {
        "model": model_ref,
        "model_class": type(model).__name__,
        "data": prepared.source,
        "samples": prepared.samples,
        "seq_len": prepared.seq_len,
        "batch_size": setup.batch_size,
        "seed": setup.seed,
        "seconds": round(time.perf_counter() - start, 3),
    }
    return ScoreTable(
        setup.method,
        tuple(names),
        scores,
        {g.key: list(g.modules) for g in groups},
        {g.key: g.numel for g in groups},
        fingerprint(src.view.config, src.view.tensors),
        metadata,
    )


def _auto_plan(
    selection: Selection, groups: list[DecisionGroup], names: list[str], method: str, table: ScoreTable
) -> AutoPlan:
    schemes: dict[str, str | None] = {}
    warnings = []
    for group in groups:
        chosen = selection.choice[group.key]
        for module in group.modules:
            schemes[module] = None if chosen == BF16 else chosen
        if group.allowed == (BF16,) and group.reason:
            warnings.append(f"{group.key}: kept BF16 ({group.reason})")
    if not selection.optimal:
        warnings.append("auto: the solver hit its time limit; the plan is the best found, not proven optimal")
    return AutoPlan(
        selection.budget,
        selection.effective_bits,
        method,
        tuple(names),
        list(groups),
        dict(selection.choice),
        schemes,
        selection.total_score,
        selection.optimal,
        table,
        warnings,
    )


def to_plan(auto_plan: AutoPlan, layout: Layout) -> Plan:
    """The exporter Plan (recipe "auto") for every module of `layout`: the chosen spec, or BF16 with why."""
    group_of = {m: g for g in auto_plan.groups for m in g.modules}
    plan = Plan(recipe=RECIPE, assignments={}, warnings=list(auto_plan.warnings))
    for name, module in sorted(layout.modules.items()):
        if name in auto_plan.schemes:
            chosen = auto_plan.schemes[name]
            group = group_of[name]
            if chosen is not None:
                plan.assignments[name] = Assignment(name, scheme(DIALECT, chosen))
            else:
                why = (
                    group.reason
                    if group.allowed == (BF16,)
                    else (f"auto kept {group.key} BF16 within the {auto_plan.budget:g}-bit budget")
                )
                plan.assignments[name] = Assignment(name, None, why)
        elif module.kind not in DECODER_LINEAR_KINDS:
            plan.assignments[name] = Assignment(
                name, None, ALWAYS_EXCLUDED_REASON.get(module.kind, f"kind {module.kind.value}")
            )
        else:
            assert not is_quantizable(module)
            weight = module.tensors.get("weight")
            shape = list(weight.shape) if weight is not None else "none"
            plan.assignments[name] = Assignment(name, None, f"not a Linear (weight shape {shape})")
    plan.needs_calibration = any(
        a.scheme is not None and a.scheme.activation_scales for a in plan.assignments.values()
    )
    return plan
