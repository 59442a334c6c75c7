"""QG218: a quantized LM head that SGLang's compressed-tensors path builds unquantized."""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators.findings import Finding
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import ERROR, FAILS, LOADS_WRONG, finding, reverse_size_mismatch
from quantgate.validators.rules._context import QUANTIZED

#: weight dtypes that keep the unquantized [vocab, hidden] shape (copied silently into a BF16 param)
UNPACKED_DTYPES = frozenset({"F8_E4M3", "F8_E5M2", "I8"})


@rule("QG218", "ct-lm-head-unquantized-in-sglang", ERROR, engines=("sglang",))
def ct_lm_head_in_sglang(ctx: Context) -> Iterator[Finding]:
    """A compressed-tensors checkpoint stores `lm_head` quantized; SGLang builds it unquantized.

    Why: SGLang's `CompressedTensorsConfig.get_quant_method` dispatches only LinearBase and FusedMoE;
    `ParallelLMHead` (a VocabParallelEmbedding) falls through to the unquantized embedding method,
    so the scale tensors are skipped ("Parameter lm_head.weight_scale not found in params_dict") and
    an FP8/INT8 weight is copied into the BF16 head without its scale: degenerate repetition from the
    first token (sglang#34895, fix PR #34904 open; vLLM serves the same checkpoint correctly since
    vllm PR #37291). A packed 4-bit head does not even fit the BF16 parameter.

    Fix: keep `lm_head` BF16 and list it in `ignore` (llm-compressor's default), or serve with vLLM.
    """
    if ctx.qc is None or not ctx.qc.is_ct or not ctx.a.active:
        return
    for cls in ctx.a.classes:
        if cls.kind != "lm_head" or cls.state.state != QUANTIZED:
            continue
        m, dtype = cls.rep, cls.state.weight_dtype
        fix = "Store lm_head BF16 and add it to `ignore`."
        if dtype in UNPACKED_DTYPES:
            yield finding("QG218", ERROR, f"{m.name} is stored quantized ({dtype}); SGLang builds a BF16 "
                          "LM head and drops its scales", modules=[m.name], fix=fix, effect=LOADS_WRONG,
                          error=f"silent: Parameter {m.name}.weight_scale not found in params_dict; unscaled "
                                "weights give degenerate repetition (sglang#34895)")
        else:
            yield finding("QG218", ERROR, f"{m.name} is stored packed ({dtype}); SGLang builds a BF16 "
                          "LM head", modules=[m.name], fix=fix, effect=FAILS, error=reverse_size_mismatch(m))
