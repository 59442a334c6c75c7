"""QG320: native fp8 block quantization: weight blocks must line up with the engines' fused and
tensor-parallel partitions (reference formats_beyond_two.md §2 "What vLLM builds")."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from validators.engines import packed_name
from validators.findings import Finding
from validators.rules import Context, rule
from validators.rules._common import ERROR, FAILS, INFO, finding
from validators.rules._context import ModClass
from validators.schemes import FP8_NATIVE

#: tensor-parallel sizes scanned for the "stops loading at TP >= N" note
TP_SIZES: tuple[int, ...] = (2, 4, 8)
COLUMN_ROLES = frozenset({"gate", "up"})     # column-parallel, output dim split (dense / shared MLP)
ROW_ROLES = frozenset({"o", "down"})         # row-parallel, input dim split


def _linear_error(size: int, block: int) -> str:
    return (f"ValueError: Weight output_partition_size = {size} is not divisible by weight quantization "
            f"block_n = {block}.")


def _row_error(size: int, block: int) -> str:
    return (f"ValueError: Weight input_size_per_partition = {size} is not divisible by weight quantization "
            f"block_k = {block}.")


def _moe_error(size: int, block: int) -> str:
    return (f"ValueError: The output_size of gate's and up's weight = {size} is not divisible by weight "
            f"quantization block_n = {block}.")


def _merged_not_last(ctx: Context, cls: ModClass) -> bool:
    """A shard of a merged linear (qkv, gate_up, fused_qkv_a) other than the last one."""
    packed = packed_name(cls.rep.name, ctx.a.naming)
    return packed is not None and cls.rep.name != packed[1][-1]


def _tp_break(cls: ModClass, out_f: int, in_f: int, b0: int, b1: int) -> tuple[int, str] | None:
    """The smallest scanned TP size at which the engine rejects this module's blocks, with its error."""
    for tp in TP_SIZES:
        if cls.kind == "expert" and cls.role in ("gate", "up") and out_f % tp == 0 and (out_f // tp) % b0:
            return tp, _moe_error(out_f // tp, b0)
        if cls.kind == "expert" and cls.role == "down" and in_f % tp == 0 and (in_f // tp) % b1:
            return tp, (f"ValueError: The input_size of down's weight = {in_f // tp} is not divisible by weight "
                        f"quantization block_k = {b1}.")
        if cls.kind != "expert" and cls.role in COLUMN_ROLES and out_f % tp == 0 and (out_f // tp) % b0:
            return tp, _linear_error(out_f // tp, b0)
        if cls.kind != "expert" and cls.role in ROW_ROLES and in_f % tp == 0 and (in_f // tp) % b1:
            return tp, _row_error(in_f // tp, b1)
    return None


@rule("QG320", "fp8-block-alignment", ERROR, per_engine=False)
def fp8_block_alignment(ctx: Context) -> Iterator[Finding]:
    """A native fp8 block checkpoint (`weight_block_size` [b0, b1]) has a partition the engines cannot
    split into whole blocks: a merged linear's non-last shard (q/k of qkv, gate of gate_up) or a MoE
    intermediate size not divisible by b0, or (info) a size that stops dividing at tensor parallelism.

    Why: vLLM and SGLang `Fp8LinearMethod.create_weights` -> `validate_fp8_block_shape` raise
    "Weight output_partition_size = N is not divisible by weight quantization block_n = 128" (merged
    and column-parallel layers; the block_k analogue for row-parallel ones), and `Fp8MoEMethod`
    "The output_size of gate's and up's weight = 192 is not divisible by weight quantization block_n
    = 128" (vllm #54178, PR #48173, PR #39046; sglang #3345). At TP > 1 the check applies per rank.

    Fix: keep the module in BF16 (list it in `ignored_layers` / `modules_to_not_convert`), re-export
    with a block size dividing the partition, or serve at a tensor-parallel size that keeps whole blocks
    (expert parallelism keeps each expert whole).
    """
    qc = ctx.qc
    block = getattr(qc.dialect_settings, "weight_block_size", None) if qc and qc.dialect == FP8_NATIVE else None
    if not block:
        return
    b0, b1 = block
    hard: dict[str, list[str]] = defaultdict(list)
    later: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
    for cls in ctx.a.quantized_classes:
        weight = cls.rep.tensors.get("weight")
        if weight is None or len(weight.shape) != 2 or cls.rep.fused is not None:
            continue
        out_f, in_f = weight.shape
        if cls.kind == "expert" and cls.role in ("gate", "up") and out_f % b0:
            hard[_moe_error(out_f, b0)].extend(cls.names)
        elif cls.kind != "expert" and out_f % b0 and _merged_not_last(ctx, cls):
            hard[_linear_error(out_f, b0)].extend(cls.names)
        else:
            broken = _tp_break(cls, out_f, in_f, b0, b1)
            if broken:
                later[broken[0]][0].extend(cls.names)
                later[broken[0]][1].append(broken[1])
    for error, names in sorted(hard.items()):
        yield finding("QG320", ERROR, f"{len(names)} fp8 module(s) cannot be split into whole {b0}x{b1} blocks "
                      "by the engine's fused layout", modules=names, effect=FAILS, error=error,
                      fix="Keep these modules BF16 (ignored_layers / modules_to_not_convert) or re-export with a "
                          "block size that divides them.")
    for tp, (names, errors) in sorted(later.items()):
        yield finding("QG320", INFO, f"{len(names)} fp8 module(s) stop loading at tensor-parallel size {tp} and "
                      f"above (e.g. {sorted(errors)[0]})", modules=names, tensor_parallel_size=tp,
                      fix=f"Serve with tensor_parallel_size < {tp}, or use expert parallelism for the experts.")
