"""QG190: a quantization method quantgate does not model gets `unknown`, never a guessed verdict."""

from __future__ import annotations

from collections.abc import Iterator

from quantgate.validators.findings import Finding, VerdictStatus
from quantgate.validators.format_support import modelled_dialects, not_modelled
from quantgate.validators.rules import Context, rule
from quantgate.validators.rules._common import WARNING


@rule("QG190", "unmodelled-quant-method", WARNING, per_engine=False)
def unmodelled_quant_method(ctx: Context) -> Iterator[Finding]:
    """The config declares a quant_method quantgate does not model (bitsandbytes, gguf, quark,
    fbgemm_fp8, hqq, torchao, ...), a compressed-tensors format without a tensor set (sparse-24-bitmask,
    marlin-24, naive-quantized, ...) or a GPTQ/AWQ bit width without one (validators/format_support.py
    lists each with its source): the verdict is `unknown` for every engine.

    Why: vLLM and SGLang load each method through its own config class, tensor set and exclusion
    semantics (reference formats_beyond_two.md §1, §6: quark's `exclude` regexes, bitsandbytes'
    dotted-component matching, fbgemm_fp8's unquantized MoE). Rules written for another dialect
    would judge such tensors wrongly and confidently (before this rule, a native fp8 checkpoint got a
    confident "fails" from QG307). Only the format-independent file checks (QG60x) still run.

    Fix: nothing is known to be wrong. Validate with that method's own tooling, or export in a
    dialect quantgate models; `quantgate validate --strict` turns `unknown` into exit status 1.
    """
    qc = ctx.qc
    gap = not_modelled(qc)
    if qc is None or gap is None:
        return
    what = f"quant_method {qc.dialect!r}" if gap.name == qc.dialect else f"{qc.dialect} format {gap.name!r}"
    yield Finding(
        code="QG190", severity=WARNING,
        message=f"{what} ({qc.source}) is not modelled by quantgate{f' ({gap.note})' if gap.note else ''}: its "
                "tensors were not checked and no engine outcome is predicted (modelled: "
                + ", ".join(modelled_dialects()) + ")",
        modules=(qc.source,),
        fix="Validate with the quantization method's own tools, or export in a modelled dialect; "
            "--strict makes an unknown verdict fail.",
        effect=VerdictStatus.UNKNOWN,
        details={"quant_method": qc.dialect, "not_modelled": gap.name})
