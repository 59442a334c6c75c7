"""QG711-QG713: does the checkpoint load at the serving shape (tensor / expert parallel, MTP draft)?"""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators import engine_facts as ef
from quantgate.validators.deployment import PROBE_SIZES, ShapeProblem, shape_problems
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, INFO, finding


def _problems(ctx: Context, tp: int, ep: bool) -> list[ShapeProblem]:
    needs = {e: bool(ctx.a.engine_fact(e, ef.EP_NEEDS_DIVISIBLE_EXPERTS, False)) for e in ctx.engines}
    return shape_problems(ctx.a, ctx.view.config, tp, ep, needs)


@rule("QG711", "parallel-shape", ERROR, per_engine=False)
def parallel_shape(ctx: Context) -> Iterator[Finding]:
    """At the requested `--tensor-parallel-size` (and `--expert-parallel`), a dimension does not split
    evenly over the ranks or a rank's shard cuts a quantization scale block.

    Why: the engines shard each linear by the TP size and check it while building the model: vLLM
    "Total number of attention heads (H) must be divisible by tensor parallel size (N)."
    (config/model.py), `divide` "X is not divisible by N" (distributed/utils.py), FP8 blocks "Weight
    input_size_per_partition = X is not divisible by weight quantization block_k = 128."
    (quantization/utils/fp8_utils.py), NVFP4 groups of 16 per shard (vllm#49949); SGLang asserts the
    same and needs num_experts % ep_size == 0 under expert parallelism (fused_moe_triton/layer.py).

    Fix: serve at a size that divides the model (see QG712), enable expert parallelism so experts are
    not split along their intermediate dim, or keep the misaligned modules BF16.
    """
    dep = ctx.deployment
    if dep is None or dep.tensor_parallel_size is None:
        return
    for p in _problems(ctx, dep.tensor_parallel_size, dep.expert_parallel):
        yield Finding(code="QG711", severity=ERROR, message=f"{dep.label()}: {p.message}",
                      modules=tuple(sorted(set(p.modules))), engines=p.engines,
                      fix="Choose a tensor-parallel size that divides the model, enable expert parallelism, "
                          "or keep these modules BF16.", effect=FAILS, predicted_error=p.error)


@rule("QG712", "parallel-limits", INFO, per_engine=False)
def parallel_limits(ctx: Context) -> Iterator[Finding]:
    """Without `--tensor-parallel-size`: the tensor-parallel sizes (with and without expert parallelism)
    at which a quantized checkpoint stops loading, and why.

    Why: engine errors at a given shape are the same as QG711's (vLLM config/model.py head check,
    fp8_utils block checks, vllm#49949 NVFP4 MoE groups at TP8); knowing the limit before deploying
    saves a failed multi-GPU start.

    Fix: deploy below the first failing size, or with expert parallelism when only experts limit it.
    """
    dep = ctx.deployment
    if (dep is not None and dep.tensor_parallel_size is not None) or not ctx.a.is_quantized:
        return
    modes = (True,) if dep is not None and dep.expert_parallel else (False, True)
    if not ctx.a.layout.num_experts:
        modes = (False,)
    first: dict[bool, tuple[int, list[ShapeProblem]] | None] = {}
    for ep in modes:
        first[ep] = next(((size, probs) for size in PROBE_SIZES if (probs := _problems(ctx, size, ep))), None)
    tp_hit = first.get(False)
    for ep, hit in first.items():
        if hit is None:
            continue
        size, problems = hit
        p = problems[0]
        if ep and tp_hit is not None and tp_hit[0] == size and tp_hit[1][0].error == p.error:
            continue                    # expert parallelism changes nothing here
        ep_hit = first.get(True, hit)
        helps = not ep and True in first and (ep_hit is None or ep_hit[0] > size)
        label = "with expert parallelism" if ep else "tensor parallel"
        yield finding("QG712", INFO, f"{label}: loads up to size {size // 2 if size > 2 else 1}; stops at "
                      f"{size}: {p.message}", modules=[m for q in problems for m in q.modules],
                      fix=f"Serve at tensor-parallel size < {size}" + (" or enable expert parallelism" if helps else ""),
                      error=p.error, size=size, expert_parallel=ep)


@rule("QG713", "draft-layers-not-excluded", INFO)
def draft_layers_not_excluded(ctx: Context) -> Iterator[Finding]:
    """MTP / nextn layers are stored BF16 and not excluded. The main model skips them (engine_facts
    SKIPS_SPEC_LAYERS), so serving loads; with speculative decoding (`--speculative-config` MTP) the
    draft model is built with the target's quant config and these layers fail or load wrong.

    Why: both engines build the draft with the target's quantization (vllm #44087 Step-3.5 NVFP4,
    vllm PR #52649, sglang PR #36158): BF16 MTP experts hit the NVFP4 size mismatch, FP8 casts silently.

    Fix: list the MTP layers in exclude_modules / ignore (`model.layers.{num_hidden_layers}*`, `mtp.*`), or
    quantize them with the rest.
    """
    if not ctx.a.active:
        return
    names = [n for cls, c in zip(ctx.a.classes, ctx.a.coverage(ctx.engine or "vllm"))
             if c.forced == "spec_layer_skipped" and c.hit is None and cls.state.state == "bf16" for n in cls.names]
    if names:
        yield finding("QG713", INFO, f"{len(names)} BF16 MTP / nextn module(s) are not excluded: fine without "
                      "speculative decoding (the main model skips them), but an MTP draft builds them quantized",
                      modules=names, fix="Exclude the MTP layers (e.g. `model.layers.N*` for N >= num_hidden_layers, "
                      "`mtp.*`) before enabling speculative decoding.")
