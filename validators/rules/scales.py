"""QG5xx: scale values (deep; reads only scale tensors, never weights).

All rules share one bulk read (`scale_values`, cached on the analysis) of the per-tensor scales:
`input_scale`, `weight_scale_2`, `weight_scale` when it is a scalar (FP8), CT `weight_global_scale`,
`input_global_scale`, and KV `k_scale` / `v_scale`; QG501/QG502 also screen every value of the
native fp8 block scales (`weight_scale_inv`, `_block_scales.py`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, LOADS_WRONG, WARNING, finding
from quantgate.validators.rules._block_scales import block_scale_scan
from quantgate.validators.rules._values import scale_table

#: an expert's activation scale this many times the layer median dominates max-reduced scales (inv. 18)
OUTLIER_FACTOR = 10.0
#: ModelOpt global scales are amax/2688 (tiny); CT stores 2688/amax (large). A weight amax of 2688
#: or more is not a real weight, so a median on the wrong side of 1.0 means the other convention.
CONVENTION_PIVOT = 1.0
MODELOPT_GLOBAL = "weight_scale_2"
CT_GLOBAL = "weight_global_scale"


def _bad(ctx: Context, test) -> list[str]:
    """Names of the scales whose value fails `test`; the per-class min/sum screens run in C."""
    table = scale_table(ctx)
    out: list[str] = []
    for (i, suffix), values in table.by_class.items():
        present = [v for v in values if v is not None]
        if not present or (min(present) > 0 and math.isfinite(sum(present))):
            continue
        members = ctx.a.classes[i].members
        out.extend(members[j].tensors[suffix].name for j, v in enumerate(values) if v is not None and test(v))
    out.extend(n for n, v in table.kv.items() if v is not None and test(v))
    return sorted(out)


@rule("QG501", "non-finite-scales", ERROR, per_engine=False, deep=True)
def non_finite(ctx: Context) -> Iterator[Finding]:
    """A scale tensor holds NaN or Inf.

    Why: invariant 18. Kernels multiply by the scale (or its reciprocal): one non-finite scale turns
    every output of the module - for a MoE layer on global-scale backends, of every expert - into NaN.

    Fix: re-calibrate; check the amax of the module (overflowing BF16 activations, empty calibration).
    """
    bad = _bad(ctx, lambda v: not math.isfinite(v)) + block_scale_scan(ctx).nonfinite
    if bad:
        yield finding("QG501", ERROR, f"{len(bad)} scale tensor(s) are NaN or Inf", modules=bad,
                      fix="Re-calibrate the listed modules.", effect=LOADS_WRONG,
                      error="silent: NaN/Inf outputs")


@rule("QG502", "zero-or-negative-scales", ERROR, per_engine=False, deep=True)
def zero_scales(ctx: Context) -> Iterator[Finding]:
    """A scale is zero or negative: typically an expert that received no calibration tokens.

    Why: invariant 18. Engines use 1/scale: zero gives inf -> NaN / pad tokens, prompt dependent
    ("'w13_input_scale' has zero or non-finite values for expert ids [40, 42, 82, 98]", vllm#45212).

    Fix: calibrate every expert (route all calibration tokens to all experts) or fill uncalibrated
    experts' scales from the layer's maximum, as ModelOpt's `set_expert_quantizer_amax` does.
    """
    bad = _bad(ctx, lambda v: math.isfinite(v) and v <= 0) + block_scale_scan(ctx).nonpositive
    if bad:
        yield finding("QG502", ERROR, f"{len(bad)} scale tensor(s) are zero or negative (uncalibrated)",
                      modules=bad, fix="Calibrate every module/expert; never ship zero scales.",
                      effect=LOADS_WRONG, error="silent: 1/0 -> inf/NaN outputs (vllm#45212)")


@rule("QG503", "outlier-expert-scales", WARNING, per_engine=False, deep=True)
def outliers(ctx: Context) -> Iterator[Finding]:
    """One expert's activation scale is more than 10x the median of its layer's experts.

    Why: invariant 18. FP8 MoE and NVFP4 global-scale backends (FlashInfer TRT-LLM, CuteDSL) use the
    maximum over all experts of a layer, so one outlier coarsens every expert's activations.

    Fix: calibrate with more representative data, or clip that expert's activation amax.
    """
    table = scale_table(ctx)
    groups: dict[tuple[str, str, str], list[tuple[int, list]]] = defaultdict(list)
    for (i, suffix), values in table.by_class.items():
        cls = ctx.a.classes[i]
        if cls.kind == "expert" and suffix in ("input_scale", "input_global_scale"):
            groups[(cls.moe_group or "", cls.role or "", suffix)].append((i, values))
    flagged: list[str] = []
    for (_, _, suffix), parts in groups.items():
        good = sorted(v for _, vals in parts for v in vals if v is not None and math.isfinite(v) and v > 0)
        if len(good) < 4:
            continue
        median = good[len(good) // 2]
        # CT stores reciprocals: an outlier amax is a *small* global scale there
        if (good[-1] <= OUTLIER_FACTOR * median) if suffix == "input_scale" else (good[0] * OUTLIER_FACTOR >= median):
            continue
        for i, vals in parts:
            members = ctx.a.classes[i].members
            flagged.extend(members[j].tensors[suffix].name for j, v in enumerate(vals)
                           if v is not None and math.isfinite(v) and v > 0 and
                           (v > OUTLIER_FACTOR * median if suffix == "input_scale" else v * OUTLIER_FACTOR < median))
    if flagged:
        yield finding("QG503", WARNING, f"{len(flagged)} expert activation scale(s) are >{OUTLIER_FACTOR:g}x their "
                      "layer's median", modules=sorted(flagged),
                      fix="Check calibration data for those experts; consider clipping their amax.")


@rule("QG504", "global-scale-convention", ERROR, per_engine=False, deep=True)
def convention(ctx: Context) -> Iterator[Finding]:
    """Global scales use the other dialect's convention: ModelOpt stores amax/2688 (small), compressed-
    tensors its reciprocal 2688/amax (large).

    Why: invariant 19. The wrong convention loads silently and every dequantised weight is off by
    roughly amax^2/2688^2 (modular#6600 got garbage this way).

    Fix: invert the global scales (1/x) when converting between ModelOpt and compressed-tensors.
    """
    table = scale_table(ctx)
    for suffix, small in ((MODELOPT_GLOBAL, True), (CT_GLOBAL, False)):
        keys = [k for k in table.by_class if k[1] == suffix]
        found = sorted(v for k in keys for v in table.by_class[k] if v is not None and math.isfinite(v) and v > 0)
        if not found:
            continue
        median = found[len(found) // 2]
        if (median > CONVENTION_PIVOT) if small else (median < CONVENTION_PIVOT):
            names = [n for i, _ in keys for n in ctx.a.classes[i].names]
            expect = "amax/2688 (< 1)" if small else "2688/amax (> 1)"
            yield finding("QG504", ERROR, f"`{suffix}` median {median:.4g} is not in the "
                          f"{'ModelOpt' if small else 'compressed-tensors'} convention {expect}", modules=names,
                          fix="Store 1/x of these global scales (the other dialect's convention).",
                          effect=LOADS_WRONG, error="silent: weights dequantised with reciprocal global scales")
