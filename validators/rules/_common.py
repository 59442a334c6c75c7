"""Helpers shared by the rule modules: finding construction and the engines' predicted error texts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from quantgate.validators.findings import Finding, Severity, VerdictStatus

if TYPE_CHECKING:
    from quantgate.validators.layout import Module
    from quantgate.validators.rules import Context

FAILS = VerdictStatus.FAILS
LOADS_WRONG = VerdictStatus.LOADS_WRONG
ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

#: bits of the stored weight element per declared modelopt algo / CT format family
PACKED_4BIT_ALGOS = frozenset({"NVFP4", "W4A16_NVFP4", "NVFP4_AWQ", "MXFP4"})


def finding(code: str, severity: Severity, message: str, *, modules: Iterable[str] = (), fix: str = "",
            effect: VerdictStatus | None = None, error: str = "", **details) -> Finding:
    return Finding(code=code, severity=severity, message=message, modules=tuple(sorted(set(modules))),
                   fix=fix, effect=effect, predicted_error=error, details=details)


def engine_label(ctx: "Context") -> str:
    return {"vllm": "vLLM", "sglang": "SGLang"}.get(ctx.engine or "", "the engines")


def declared_label(ctx: "Context") -> str:
    qc = ctx.qc
    if qc is None:
        return "no quantization"
    if qc.is_modelopt:
        return qc.quant_algo or "an unknown algo"
    label = getattr(qc.params, "label", None)     # registered dialects (fp8 ...) name themselves
    if label:
        return label
    if qc.is_ct:
        return qc.ct_format or "compressed-tensors"
    bits = getattr(qc.params, "bits", None)         # gptq / awq
    return f"{qc.dialect} {bits}-bit" if isinstance(bits, int) else qc.dialect


def declares_packed_4bit(ctx: "Context", module: "Module | None" = None) -> bool:
    """Does the engine build 4-bit packed parameters (half the input dim) for quantized modules?"""
    qc = ctx.qc
    if qc is None:
        return False
    if qc.is_modelopt:
        algo = qc.quant_algo or ""
        if algo == "MIXED_PRECISION" and module is not None:
            algo = ctx.a.declared_algo(module, module.name) or ""
        return algo in PACKED_4BIT_ALGOS or "FP4" in algo
    return "pack-quantized" in (qc.ct_format or "") or "nvfp4" in (qc.ct_format or "")


def size_mismatch(module: "Module") -> str:
    """The copy_ error of a BF16 [out, in] weight loaded into a packed [out, in/2] parameter (§4.3)."""
    width = module.in_features or 0
    return (f"RuntimeError: The size of tensor a ({width // 2}) must match the size of tensor b ({width}) "
            "at non-singleton dimension 1")


def reverse_size_mismatch(module: "Module") -> str:
    """A packed [out, in/2] weight loaded into the BF16 [out, in] parameter of an excluded module."""
    width = module.in_features or 0
    return (f"RuntimeError: The size of tensor a ({width}) must match the size of tensor b ({width // 2}) "
            "at non-singleton dimension 1")


def no_param(engine_name: str, suffix: str) -> str:
    return f"ValueError: There is no module or parameter named '{engine_name}.{suffix}'"
