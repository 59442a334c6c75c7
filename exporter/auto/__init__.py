"""`auto` recipe: per-layer mixed precision (NVFP4 / FP8 / BF16) under an effective-bits budget.

groups.py     decision units (q/k/v, gate/up, all routed experts of a layer) from the layout
fakequant.py  quantize-then-dequantize with the export's numerics and scale sharing
runtime.py    layout module -> writable [out, in] view of the transformers runtime weight
perturb.py    put a group / a whole plan into its fake-quantized state and back
scoring.py    kl_div and gradient (diagonal Fisher) sensitivity per group and scheme
scores_file.py  scores on disk, fingerprinted, for re-planning without forward passes
optimize.py   exact selection (integer program, SciPy milp / HiGHS)
planner.py    plan_auto(...) -> AutoPlan; to_plan(AutoPlan, layout) -> exporter.recipes.Plan
"""

from __future__ import annotations

from quantgate.exporter.auto.groups import BF16, DecisionGroup, candidate_specs, decision_groups, effective_bits
from quantgate.exporter.auto.optimize import InfeasibleBudgetError, Selection, select
from quantgate.exporter.auto.planner import AutoPlan, plan_auto, to_plan
from quantgate.exporter.auto.scores_file import ScoresFileError, ScoreTable

__all__ = [
    "BF16",
    "AutoPlan",
    "DecisionGroup",
    "InfeasibleBudgetError",
    "ScoreTable",
    "ScoresFileError",
    "Selection",
    "candidate_specs",
    "decision_groups",
    "effective_bits",
    "plan_auto",
    "select",
    "to_plan",
]
