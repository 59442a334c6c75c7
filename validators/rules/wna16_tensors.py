"""QG340, QG341: GPTQ / AWQ tensors against the config: group size per module, g_idx for desc_act.

The tensor set, dtypes and packing are the scheme table's (QG301-QG303); these rules add what the
table cannot know: the group size the config (and GPTQModel `dynamic` overrides) promises each module.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.engines import ENGINE_SEMANTICS
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, LOADS_WRONG, finding
from quantgate.validators.rules._wna16 import applies
from quantgate.validators.schemes import GPTQ
from quantgate.validators.schemes_beyond import groups


@rule("QG340", "wna16-group-size", ERROR, per_engine=False)
def group_size(ctx: Context) -> Iterator[Finding]:
    """A GPTQ/AWQ module's scales do not hold the group count the config's group_size gives (per-module
    `dynamic` overrides applied), or its input size is not a multiple of the group size.

    Why: vLLM sizes `scales` / `qzeros` as [in / group_size, out] from the config (`gptq_marlin.py`
    `create_weights`); other row counts fail in the copy, and `in % group_size != 0` raises
    "ValueError: The input size is not aligned with the quantized weight shape" (also per tensor-parallel
    shard).

    Fix: write the group size the tensors were quantized with (or a `dynamic` override for those modules).
    """
    if not applies(ctx):
        return
    p = ctx.qc.params
    sem = ENGINE_SEMANTICS["vllm"]
    misaligned: dict[int, list[str]] = defaultdict(list)
    wrong: dict[tuple[int, int, int], list[str]] = defaultdict(list)
    for cls in ctx.a.quantized_classes:
        spec = cls.state.scheme
        scales = cls.rep.tensors.get("scales")
        if spec is None or spec.dialect != ctx.qc.dialect or scales is None or len(scales.shape) != 2:
            continue
        weight = cls.rep.tensors[spec.weight_suffix]
        in_f = spec.logical_from_weight(weight.shape)[1]
        group = p.override(sem.engine_name(cls.rep.name, ctx.a.architecture), "group_size", p.group_size)
        if not isinstance(group, int) or (group <= 0 and group != -1):
            continue
        if group != -1 and in_f % group:
            misaligned[group].extend(cls.names)
        elif scales.shape[0] != groups(in_f, group):
            wrong[(group, groups(in_f, group), scales.shape[0])].extend(cls.names)
    for group, names in sorted(misaligned.items()):
        yield finding("QG340", ERROR, f"{len(names)} module(s) have input sizes not divisible by group_size {group}",
                      modules=names, fix="Use a group size dividing the input size (or -1), or keep them BF16.",
                      effect=FAILS, error="ValueError: The input size is not aligned with the quantized weight shape. "
                                          "This can be caused by too large tensor parallel size.")
    for (group, want, got), names in sorted(wrong.items()):
        yield finding("QG340", ERROR, f"{len(names)} module(s) store {got} scale groups; group_size {group} gives "
                      f"{want}", modules=names, fix="Declare the group size the tensors were quantized with.",
                      effect=FAILS, error=f"RuntimeError: The size of tensor a ({want}) must match the size of tensor "
                                          f"b ({got}) at non-singleton dimension 0")


@rule("QG341", "gptq-desc-act-without-g-idx", ERROR, per_engine=False)
def desc_act_g_idx(ctx: Context) -> Iterator[Finding]:
    """A GPTQ config says `desc_act: true` (activation order) but modules have no `g_idx`.

    Why: with act-order vLLM's Marlin sorts the input channels by `g_idx`
    (`marlin_sort_g_idx`); the parameter is created with `torch.empty` and nothing checks it was
    loaded (vllm PR #57108), so the permutation is garbage and so are the outputs.

    Fix: ship `g_idx` for every quantized module, or re-quantize with desc_act false.
    """
    if not applies(ctx) or ctx.qc.dialect != GPTQ or ctx.qc.params.desc_act is not True:
        return
    if ctx.qc.params.group_size == -1:      # vLLM: act_order with one group is the same as none
        return
    names = [n for c in ctx.a.quantized_classes if c.state.scheme is not None and c.state.scheme.dialect == GPTQ
             and "g_idx" not in c.rep.tensors for n in c.names]
    if names:
        yield finding("QG341", ERROR, f"{len(names)} GPTQ module(s) lack `g_idx` while desc_act is true",
                      modules=names, fix="Export g_idx (AutoGPTQ/GPTQModel always do) or set desc_act false.",
                      effect=LOADS_WRONG, error="silent: g_idx stays torch.empty; inputs are permuted by garbage")
