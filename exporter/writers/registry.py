"""Dialect name -> the writer the streaming weight pass drives (`quantgate.exporter.weight_pass.write_export`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS
from quantgate.exporter.recipes import Plan
from quantgate.exporter.source import Source
from quantgate.exporter.writers import bmm_experts, compressed_tensors, hf_fp8, modelopt, mxfp4_native
from quantgate.exporter.writers.common import DialectWriter
from quantgate.validators.errors import UsageError
from quantgate.validators.schemes import COMPRESSED_TENSORS, FP8_NATIVE, MODELOPT, MXFP4


def _modelopt_configs(source: Source, plan: Plan) -> Callable[[Path], None]:
    from quantgate.exporter.writers.modelopt_mixed import write_quant_configs

    excludes = modelopt.build_excludes(source, plan)   # looked up at call time (tests patch it)

    def write(out_dir: Path) -> None:
        write_quant_configs(out_dir, source, plan, excludes.patterns)   # uniform, or MIXED_PRECISION
    return write


def _modelopt_quantize(job, source, scales, device, weights=None, numerics=DEFAULT_NUMERICS):
    if isinstance(job, bmm_experts.BmmJob):   # transposed 3-D experts stay 3-D
        return bmm_experts.quantize_bmm(job, source, scales, device, weight=weights, numerics=numerics)
    return modelopt.quantize_group(job, source, scales, device, weights=weights, numerics=numerics)


WRITERS: dict[str, DialectWriter] = {
    MODELOPT: DialectWriter(MODELOPT, bmm_experts.build_modelopt_units, _modelopt_quantize, _modelopt_configs),
    COMPRESSED_TENSORS: DialectWriter(COMPRESSED_TENSORS, compressed_tensors.build_ct_units,
                                      compressed_tensors.quantize_group, compressed_tensors.prepare_configs),
    FP8_NATIVE: DialectWriter(FP8_NATIVE, hf_fp8.build_fp8_units, hf_fp8.quantize_group, hf_fp8.prepare_configs),
    MXFP4: DialectWriter(MXFP4, mxfp4_native.build_native_units, mxfp4_native.quantize_native,
                         mxfp4_native.prepare_configs),
}


def writer_for(dialect: str) -> DialectWriter:
    try:
        return WRITERS[dialect]
    except KeyError:
        raise UsageError(f"unknown dialect {dialect!r}; supported: {', '.join(WRITERS)}") from None
