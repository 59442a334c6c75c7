"""Fake quantization (quantize, then dequantize) with the export's own numerics and scale sharing.

What a scored or evaluated model sees for a module under a scheme is exactly what the export will
hold for it: the registry entry's `quantize` / `dequantize` (`quantgate.exporter.schemes`), with the
same per-tensor scale sharing (NVFP4: every fused group shares `weight_scale_2`; FP8: an expert's
gate/up share `weight_scale`; the entry's `shared_scale_kinds`). Weights only: activation
quantization needs the calibration pass, which scoring does not run (documented limitation; it
makes both methods blind to activation outliers, as ModelOpt's weight-only sensitivity is).

Weights are `[out, in]` tensors (any float dtype; views of a runtime parameter work); the result
has the input's dtype and shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from quantgate.exporter.schemes import scheme_for_algo
from quantgate.exporter.schemes.apply import fake_quant
from quantgate.validators.errors import QuantgateError
from quantgate.validators.layout import Kind


def fake_quant_fused(weights: Sequence[Tensor], quant_algo: str, kind: Kind) -> list[Tensor]:
    """Fake-quantize the members of ONE fused group (or one lone module) as the export would.

    weights: the members' [out, in] weights; quant_algo: the ModelOpt name of the scheme;
    kind: their layout kind (decides scale sharing).
    """
    entry = scheme_for_algo(quant_algo)
    if entry is None:
        raise QuantgateError(f"no scheme with quant_algo {quant_algo!r} to fake-quantize")
    return fake_quant(entry, weights, kind)
