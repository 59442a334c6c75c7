"""`auto` recipe: per-layer mixed precision (NVFP4 / FP8 / BF16) under an effective-bits budget.

groups.py     decision units (q/k/v, gate/up, all routed experts of a layer) from the layout
fakequant.py  quantize-then-dequantize with the export's numerics and scale sharing
runtime.py    layout module -> writable [out, in] view of the transformers runtime weight
perturb.py    put a group / a whole plan into its fake-quantized state and back
scoring.py    kl_div and gradient (diagonal Fisher) sensitivity per group and scheme
scores_file.py  scores on disk, fingerprinted, for re-planning without forward passes
optimize.py   exact selection (integer program, SciPy milp / HiGHS)
planner.py    plan_auto(...) -> AutoPlan; to_plan(AutoPlan, layout) -> exporter.recipes.Plan
options.py    the recipe's options, checked without torch (CLI, API schema, request checks)
stage.py      the pipeline stage: load once, score, plan

The names below are imported on first use (PEP 562), so `quantgate.exporter.auto.options` stays
cheap for the CLI and the API schema.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "BF16": "groups", "DecisionGroup": "groups", "candidate_specs": "groups", "decision_groups": "groups",
    "effective_bits": "groups",
    "InfeasibleBudgetError": "optimize", "Selection": "optimize", "select": "optimize",
    "AutoPlan": "planner", "plan_auto": "planner", "to_plan": "planner",
    "ScoresFileError": "scores_file", "ScoreTable": "scores_file",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
