"""Fake quantization (quantize, then dequantize) with the export's own numerics and scale sharing.

What a scored or evaluated model sees for a module under a scheme is exactly what the export will
hold for it: the same `quantize_*` functions the writer calls, and the same per-tensor scale
sharing (NVFP4: every fused group shares `weight_scale_2`; FP8: an expert's gate/up share
`weight_scale`; the table is the writer's `SHARED_WEIGHT_SCALE_KINDS`). Weights only: activation
quantization needs the calibration pass, which scoring does not run (documented limitation; it
makes both methods blind to activation outliers, as ModelOpt's weight-only sensitivity is).

Weights are `[out, in]` tensors (any float dtype; views of a runtime parameter work); the result
has the input's dtype and shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from quantgate.exporter.numerics.fp8 import dequantize_fp8, fp8_scale, quantize_fp8
from quantgate.exporter.numerics.nvfp4 import dequantize_nvfp4, quantize_nvfp4, shared_global_scale
from quantgate.validators.layout import Kind

#: Per-tensor scale of a fused group from its members' weights (None: each member its own).
SharedScale = Callable[[Sequence[Tensor]], Tensor]
#: (weight [out, in], shared per-tensor scale or None) -> dequantized weight [out, in].
FakeQuant = Callable[[Tensor, Tensor | None], Tensor]


def _fq_nvfp4(w: Tensor, weight_scale_2: Tensor | None) -> Tensor:
    packed, block_scale, ws2 = quantize_nvfp4(w, weight_scale_2)
    return dequantize_nvfp4(packed, block_scale, ws2, dtype=w.dtype)


def _fq_fp8(w: Tensor, weight_scale: Tensor | None) -> Tensor:
    q, scale = quantize_fp8(w, weight_scale)
    return dequantize_fp8(q, scale, dtype=w.dtype)


def _fp8_shared(weights: Sequence[Tensor]) -> Tensor:
    return fp8_scale(torch.stack([w.abs().amax().float() for w in weights]).max())


#: quant_algo -> (fake quant of one weight, shared per-tensor scale of a fused group).
FAKE_QUANT: dict[str, tuple[FakeQuant, SharedScale]] = {
    "NVFP4": (_fq_nvfp4, shared_global_scale),
    "W4A16_NVFP4": (_fq_nvfp4, shared_global_scale),
    "FP8": (_fq_fp8, _fp8_shared),
}


def _shared_scale_kinds() -> dict[str, frozenset[Kind]]:
    """The writer's table of which kinds share the per-tensor weight scale in a fused group."""
    from quantgate.exporter.writers.modelopt import SHARED_WEIGHT_SCALE_KINDS

    table = dict(SHARED_WEIGHT_SCALE_KINDS)
    table.setdefault("W4A16_NVFP4", table.get("NVFP4", frozenset()))
    return table


def fake_quant_fused(weights: Sequence[Tensor], quant_algo: str, kind: Kind) -> list[Tensor]:
    """Fake-quantize the members of ONE fused group (or one lone module) as the export would.

    weights: the members' [out, in] weights; kind: their layout kind (decides scale sharing).
    """
    fq, shared = FAKE_QUANT[quant_algo]
    share = len(weights) > 1 and kind in _shared_scale_kinds().get(quant_algo, frozenset())
    scale = shared(weights) if share else None
    return [fq(w, scale) for w in weights]
