"""QG320: fp8 block quantization (native fp8 and compressed-tensors FP8_BLOCK): weight blocks must line up
with the engines' fused partitions (tensor-parallel partitions: rules/deployment.py QG711/QG712)
(reference formats_beyond_two.md §2 "What vLLM builds")."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from quantgate.validators.fp8_engines import block_split_error
from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, finding
from quantgate.validators.schemes import CT_FLOAT_STRATEGY, FP8_NATIVE, SchemeSpec


def _block(ctx: Context, spec: SchemeSpec | None) -> tuple[int, int] | None:
    """The (b0, b1) weight block: native fp8 declares it (`weight_block_size`); compressed-tensors
    FP8_BLOCK (float-quantized, strategy block) stores 128x128 blocks, its spec's group size."""
    qc = ctx.qc
    if qc is not None and qc.dialect == FP8_NATIVE:
        block = getattr(qc.params, "weight_block_size", None)
        return (block[0], block[1]) if block else None
    if spec is not None and spec.name == CT_FLOAT_STRATEGY["block"] and spec.ct_format and spec.group_size:
        return spec.group_size, spec.group_size
    return None


@rule("QG320", "fp8-block-alignment", ERROR, per_engine=False)
def fp8_block_alignment(ctx: Context) -> Iterator[Finding]:
    """An fp8 block checkpoint (native `weight_block_size` [b0, b1]; compressed-tensors FP8_BLOCK
    128x128) has a partition the engines cannot split into whole blocks: a merged linear's non-last
    shard (q/k of qkv, gate of gate_up) or a MoE intermediate size not divisible by b0. (Sizes that stop dividing at tensor parallelism are QG711 /
    QG712's, which read the block from the scheme's `weight_block`.)

    Why: vLLM and SGLang `Fp8LinearMethod.create_weights` -> `validate_fp8_block_shape` raise
    "Weight output_partition_size = N is not divisible by weight quantization block_n = 128" (merged
    and column-parallel layers; the block_k analogue for row-parallel ones; vLLM's compressed-tensors
    `CompressedTensorsW8A8Fp8.create_weights` runs the same check: seen on vLLM CPU 0.32), and
    `Fp8MoEMethod` "The output_size of gate's and up's weight = 192 is not divisible by weight quantization block_n
    = 128" (vllm #54178, PR #48173, PR #39046; sglang #3345).

    Fix: keep the module in BF16 (list it in `ignored_layers` / `modules_to_not_convert` / `ignore`), or
    re-export with a block size dividing the partition.
    """
    hard: dict[str, list[str]] = defaultdict(list)
    blocks: set[tuple[int, int]] = set()
    for cls in ctx.a.quantized_classes:
        weight = cls.rep.tensors.get("weight")
        block = _block(ctx, cls.state.scheme)
        if block is None or weight is None or len(weight.shape) != 2 or cls.rep.fused is not None:
            continue
        blocks.add(block)
        error = block_split_error(cls.rep.name, cls.kind, cls.role, weight.shape[0], block[0], ctx.a.naming)
        if error is not None:
            hard[error].extend(cls.names)
    if not hard:
        return
    b0, b1 = min(blocks)
    for error, names in sorted(hard.items()):
        yield finding("QG320", ERROR, f"{len(names)} fp8 module(s) cannot be split into whole {b0}x{b1} blocks "
                      "by the engine's fused layout", modules=names, effect=FAILS, error=error,
                      fix="Keep these modules BF16 (ignored_layers / modules_to_not_convert / ignore) or re-export "
                          "with a block size that divides them.")
