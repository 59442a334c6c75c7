"""The `auto` recipe inside `run_quantize`: plan under the bit budget, then export like any plan.

The pipeline calls `plan_for_request` instead of `make_plan`; the rest (calibration of the
quantized modules' activation scales, the weight pass, validation) is the same. The scoring tokens
are the request's calibration data (`--calib-data`, `--calib-seq-len`); `--score-samples` sets how
many sequences are scored. Next to the weights the export gets:

* `auto_plan.json`: the budget, the achieved effective bits, modules and numel per scheme, the
  scheme of every decision group and module (what the report states);
* `auto_scores.json`: the scores, so `--scores <export>/auto_scores.json` re-plans the same
  source at another budget without a forward pass.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from quantgate.exporter.auto.groups import candidate_specs, decision_groups
from quantgate.exporter.auto.optimize import check_feasible
from quantgate.exporter.auto.planner import AutoPlan, plan_auto, to_plan
from quantgate.exporter.auto.options import check_candidates
from quantgate.exporter.progress import ProgressCallback
from quantgate.exporter.recipes import Plan
from quantgate.validators.errors import UsageError

log = logging.getLogger(__name__)

AUTO_PLAN_FILE = "auto_plan.json"
AUTO_SCORES_FILE = "auto_scores.json"
#: `gradient` wants per-sequence gradients (its Fisher estimate); `kl_div` batches like calibration.
GRADIENT_BATCH_SIZE = 1


def score_batch_size(method: str, calib_batch_size: int) -> int:
    return GRADIENT_BATCH_SIZE if method == "gradient" else calib_batch_size


def plan_for_request(req: Any, source: Any, progress: ProgressCallback | None = None,
                     session: Any | None = None) -> tuple[Plan, AutoPlan]:
    """(exporter Plan, AutoPlan) for a QuantizeRequest with recipe `auto` (options already checked).

    An unreachable budget is refused before the model is loaded or scored. `session`: the job's
    `quantgate.exporter.calibration.session.ModelSession`; the model scoring loads stays there for calibration.
    """
    candidates = check_candidates(req.candidates)
    check_feasible(decision_groups(source.layout, candidate_specs(candidates), tuple(req.exclude)), float(req.bits))
    auto = plan_auto(
        source, float(req.bits), candidates, method=req.method,
        score_samples=req.score_samples, score_seq_len=req.calib_seq_len,
        score_batch_size=score_batch_size(req.method, req.calib_batch_size), scores_file=req.scores,
        data=req.calib_data, device=req.device, exclude=tuple(req.exclude), token=req.token,
        revision=req.revision, progress=progress, session=session)
    plan = to_plan(auto, source.layout)
    if not plan.quantized():
        raise UsageError(f"auto at {req.bits:g} bits keeps every decoder Linear BF16 (effective bits "
                         f"{auto.effective_bits:g}): there is nothing to quantize and the source already is "
                         "that model; lower --bits (e.g. 8 for FP8, 4.5 for NVFP4)")
    log.info("%s", describe(auto.summary()))
    return plan, auto


def plan_record(auto: AutoPlan) -> dict[str, Any]:
    """`auto_plan.json`: the summary plus the scheme of every quantizable module (null = BF16)."""
    return {**auto.summary(), "warnings": list(auto.warnings), "modules": dict(sorted(auto.schemes.items()))}


def write_auto_files(out_dir: Path, auto: AutoPlan) -> None:
    from quantgate.exporter.jsonfile import write_json_atomic

    write_json_atomic(out_dir / AUTO_PLAN_FILE, plan_record(auto), indent=1)
    auto.scores.save(out_dir / AUTO_SCORES_FILE)


def describe(summary: dict[str, Any]) -> str:
    """One line for logs and the CLI: achieved bits against the budget, and modules per scheme."""
    parts = [f"{name} {entry['modules']} module{'s' if entry['modules'] != 1 else ''}"
             for name, entry in sorted(summary["by_scheme"].items(), key=lambda kv: -kv[1]["numel"])]
    return (f"auto: {summary['effective_bits']:.3f} effective bits (budget {summary['bits_budget']:g}, "
            f"method {summary['method']}): {', '.join(parts)}")
