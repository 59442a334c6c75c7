"""Exact selection of one scheme per decision group under an effective-bits budget.

The problem is a multiple-choice knapsack:

    minimise   Σ_g Σ_c score[g, c] · x[g, c]
    subject to Σ_c x[g, c] = 1                                  for every group g
               Σ_g Σ_c numel[g] · bits[c] · x[g, c] <= budget · Σ_g numel[g]
               x[g, c] ∈ {0, 1}, and x[g, c] = 0 where group g cannot hold scheme c

solved as an integer program by SciPy's `milp` (HiGHS branch and bound, relative gap 0: a proven
optimum, not a greedy guess). BF16 (16 bits, score 0 by definition: it is the reference) is always
allowed, so every budget >= the smallest achievable effective bits is feasible. Ties are broken
toward higher precision: a second solve keeps the optimal total score and uses as many bits as
the budget allows (a candidate whose score is exactly zero, e.g. a weight FP8 represents exactly,
is then not chosen over BF16 for nothing).

The capacity constraint is checked again exactly after the solve (HiGHS works in floating point,
with a feasibility tolerance); a solution that overshoots by even one bit is rejected.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from quantgate.exporter.auto.groups import BF16, DecisionGroup, effective_bits, scheme_bits
from quantgate.validators.errors import UsageError

log = logging.getLogger(__name__)

#: Objective coefficients are scaled so that the largest score is this (HiGHS is happiest with
#: coefficients of order one; the optimum does not depend on a common positive factor).
SCORE_SCALE = 1.0
#: Relative slack on the optimal score allowed in the tie-breaking solve.
TIE_TOLERANCE = 1e-9
#: HiGHS time limit per solve; instances here have at most a few thousand binaries.
TIME_LIMIT_S = 120.0


class InfeasibleBudgetError(UsageError):
    """The bit budget is below what the candidates can reach (e.g. under 4.5 bits with NVFP4)."""


@dataclass(frozen=True)
class Selection:
    """The chosen scheme per group, its total score and the effective bits it reaches."""

    choice: dict[str, str]  # group key -> scheme name or BF16
    total_score: float
    effective_bits: float
    budget: float
    optimal: bool  # proven optimal by the solver


def min_effective_bits(groups: Sequence[DecisionGroup]) -> float:
    """The smallest effective bits any assignment reaches (each group at its cheapest scheme)."""
    total = sum(g.numel for g in groups)
    return sum(min(g.bits_cost(s) for s in g.allowed) for g in groups) / total


def check_feasible(groups: Sequence[DecisionGroup], budget: float) -> None:
    """Raise InfeasibleBudgetError when no assignment fits `budget` (checkable before any scoring)."""
    floor = min_effective_bits(groups)
    if budget < floor - 1e-12:
        raise InfeasibleBudgetError(
            f"auto: a budget of {budget:g} bits per weight is infeasible: the smallest effective bits the "
            f"candidates reach is {floor:.4f} (every group at its cheapest scheme; NVFP4 counts 4.5 bits "
            "with its scales). Raise --bits, or add a cheaper candidate."
        )


def select(
    groups: Sequence[DecisionGroup], scores: Mapping[str, Mapping[str, float]], budget: float
) -> Selection:
    """Minimise Σ score subject to effective bits <= `budget` (see the module docstring).

    scores: group key -> scheme name -> score (>= 0, lower is better); BF16 scores 0 when absent.
    Raises InfeasibleBudgetError when `budget` is below `min_effective_bits(groups)`.
    """
    if not groups:
        raise UsageError("auto: nothing to select: no decision groups")
    if not math.isfinite(budget) or budget <= 0:
        raise UsageError(f"auto: --bits must be a positive number of bits per weight, got {budget}")
    check_feasible(groups, budget)
    columns = [(g, s) for g in groups for s in g.allowed]
    cost = np.array([_score(scores, g, s) for g, s in columns], dtype=np.float64)
    if (cost < 0).any() or not np.isfinite(cost).all():
        bad = next((g.key, s) for (g, s), c in zip(columns, cost) if c < 0 or not math.isfinite(c))
        raise UsageError(f"auto: score of {bad[0]} under {bad[1]} is negative or not finite")
    weight, capacity = _integer_knapsack(columns, groups, budget)
    scale = SCORE_SCALE / cost.max() if cost.max() > 0 else 1.0
    x, optimal = _solve(columns, groups, cost * scale, weight, capacity, extra=None)
    best = float(cost @ x) * scale
    # tie-break: among (numerically) optimal solutions, use the most bits the budget allows
    x2, optimal2 = _solve(
        columns,
        groups,
        -weight / max(capacity, 1),
        weight,
        capacity,
        extra=(cost * scale, best * (1 + TIE_TOLERANCE) + TIE_TOLERANCE),
    )
    if x2 is not None and float(cost @ x2) <= float(cost @ x) * (1 + TIE_TOLERANCE) + TIE_TOLERANCE / scale:
        x, optimal = x2, optimal and optimal2
    choice = {g.key: s for (g, s), v in zip(columns, x) if v > 0.5}
    _check_exact(groups, choice, budget)
    total = sum(_score(scores, g, choice[g.key]) for g in groups)
    achieved = effective_bits(groups, choice)
    log.info(
        "auto: %d groups, budget %.3f bits -> %.4f effective bits, total score %.6g",
        len(groups),
        budget,
        achieved,
        total,
    )
    return Selection(choice, total, achieved, budget, optimal)


def _score(scores: Mapping[str, Mapping[str, float]], group: DecisionGroup, scheme_name: str) -> float:
    if scheme_name == BF16:
        return float(scores.get(group.key, {}).get(BF16, 0.0))
    try:
        return float(scores[group.key][scheme_name])
    except KeyError:
        raise UsageError(
            f"auto: no score for group {group.key} under {scheme_name}; rescore "
            "(the scores file does not cover this candidate or group)"
        ) from None


def _integer_knapsack(
    columns: Sequence[tuple[DecisionGroup, str]], groups: Sequence[DecisionGroup], budget: float
) -> tuple[np.ndarray, int]:
    """Capacity row in exact integers: numel·bits per column scaled by the common denominator of
    the bits (4.5 -> halves), divided by the gcd of all of them, and the budget rounded down in the
    same unit. With integral coefficients and binaries, HiGHS's feasibility tolerance cannot let
    an overshoot through."""
    exact = [g.numel * _bits(s) for g, s in columns]
    denominator = math.lcm(*(f.denominator for f in exact))
    raw = [int(f * denominator) for f in exact]
    unit = math.gcd(*raw)
    capacity = math.floor(Fraction(budget) * sum(g.numel for g in groups) * denominator) // unit
    return np.array([w // unit for w in raw], dtype=np.float64), capacity


def _bits(scheme_name: str) -> Fraction:
    """Bits per weight as an exact fraction (4.5 -> 9/2; scale overheads are k/16, k/128 ...)."""
    return Fraction(scheme_bits(scheme_name)).limit_denominator(1 << 16)


def _solve(
    columns: Sequence[tuple[DecisionGroup, str]],
    groups: Sequence[DecisionGroup],
    objective: np.ndarray,
    weight: np.ndarray,
    capacity: int,
    extra: tuple[np.ndarray, float] | None,
) -> tuple[np.ndarray | None, bool]:
    """One HiGHS solve; `extra` = (row, upper bound) adds Σ row·x <= bound (the tie-break)."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    index = {g.key: i for i, g in enumerate(groups)}
    rows = np.array([index[g.key] for g, _ in columns])
    one_hot = csr_array(
        (np.ones(len(columns)), (rows, np.arange(len(columns)))), shape=(len(groups), len(columns))
    )
    constraints = [LinearConstraint(one_hot, 1, 1), LinearConstraint(weight[None, :], -np.inf, capacity)]
    if extra is not None:
        constraints.append(LinearConstraint(extra[0][None, :], -np.inf, extra[1]))
    result = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0, "time_limit": TIME_LIMIT_S},
    )
    if result.x is None:
        if extra is None:
            raise UsageError(f"auto: the integer program found no solution ({result.message})")
        return None, False
    x = np.round(result.x)
    if float(weight @ x) > capacity:
        if extra is None:
            raise UsageError(
                "auto: the solver returned an assignment over the bit budget; this is a bug, please report it"
            )
        return None, False
    if result.status != 0:
        log.warning("auto: solver stopped early (%s); using the best solution found", result.message)
    return x, result.status == 0


def _check_exact(groups: Sequence[DecisionGroup], choice: Mapping[str, str], budget: float) -> None:
    """The chosen assignment's effective bits, recomputed exactly, must not exceed the budget."""
    if set(choice) != {g.key for g in groups}:
        raise UsageError("auto: the solver did not choose exactly one scheme per group; this is a bug")
    used = sum(g.numel * _bits(choice[g.key]) for g in groups)
    if used > Fraction(budget) * sum(g.numel for g in groups):
        raise UsageError(
            f"auto: assignment over budget ({effective_bits(groups, dict(choice)):.6f} > {budget} "
            "bits); this is a bug, please report it"
        )
