"""FP8 E4M3 per-tensor weights and static activation scales, bit-identical to ModelOpt 0.47.

ModelOpt's FP8 export (``reference/lab_modelopt.md`` §6):
- ``weight_scale = amax / 448`` as fp32 ``[]`` (``torch.tensor(amax / maxbound)`` on the quantizer's
  0-d amax: on CUDA ``amax * fl32(1/448)``); ModelOpt's ``export_amax`` turns a zero amax into the
  format maximum, so an all-zero weight gets scale 1.0.
- ``weight = (W.to(model_dtype) / weight_scale).to(float8_e4m3fn)``. For a BF16 model the quotient
  is rounded to BF16 before the e4m3 cast (the division's dtype is the weight's). An fp32-only
  implementation differs from ModelOpt in 53 of the 2048 elements of the shared fixture, so we
  reproduce the double rounding. On CUDA the scale itself is rounded to BF16 first
  (`quantgate.exporter.numerics.modes.weight_over_scale`).
- ``input_scale = input_amax / 448`` (``activation_scale``; on CUDA ``amax * fl32(1/448)``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from quantgate.exporter.numerics.common import (
    NumericsError,
    abs_max,
    as_scalar_scale,
    check_shared_scale,
    check_weight,
    require_finite,
    row_chunks,
)
from quantgate.exporter.numerics.modes import DEFAULT_NUMERICS, scalar_div, weight_over_scale

E4M3_MAX = 448.0
FP8_DTYPE = torch.float8_e4m3fn


def fp8_scale(amax: Tensor, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """Per-tensor FP8 scale: ``amax / 448`` in fp32 as ``numerics`` divides; a zero amax gives 1.0
    (ModelOpt ``export_amax``). amax [] or [...] -> fp32 of the same shape."""
    a = amax.float()
    a = torch.where(a == 0, torch.full_like(a, E4M3_MAX), a)
    return scalar_div(a, E4M3_MAX, numerics)


def quantize_fp8(w: Tensor, weight_scale: Tensor | None = None,
                 numerics: str = DEFAULT_NUMERICS) -> tuple[Tensor, Tensor]:
    """Per-tensor FP8 E4M3 quantization of one matrix or a stack of them.

    w [..., out, in] (bf16/fp16/fp32) -> (q float8_e4m3fn [..., out, in], weight_scale fp32 [...]).
    ``weight_scale`` may be passed to share one scale across a fused group or a 3-D expert tensor
    (0-d: compute it with `fp8_scale` on the group's max amax; it must cover every matrix,
    amax <= 448 * scale), or one per matrix [...]; None gives each matrix its own.
    ``numerics`` (`quantgate.exporter.numerics.modes`) picks how the scale and ``W / weight_scale`` are rounded.
    """
    if w.ndim <= 2:
        check_weight(w, what="FP8")
    else:
        check_weight(w.reshape(-1, w.shape[-1]), what="FP8")
    lead, (out_f, in_f) = w.shape[:-2], w.shape[-2:]
    rows = w.reshape(-1, in_f)                                   # [matrices x out, in]
    amax = abs_max(rows, last_dim=True).reshape(-1, out_f).amax(dim=1).float().reshape(lead)   # [...], row-chunked
    require_finite(amax, what="FP8")
    shared = weight_scale is not None
    if weight_scale is None:
        weight_scale = fp8_scale(amax, numerics)
    elif torch.as_tensor(weight_scale).numel() == 1:
        weight_scale = as_scalar_scale(weight_scale, w.device, what="FP8 weight_scale")
        check_shared_scale(amax.max(), weight_scale, E4M3_MAX, what="FP8", scale_name="weight_scale")
    else:
        weight_scale = weight_scale.to(device=w.device, dtype=torch.float32).reshape(lead)
        for a, s in zip(amax.reshape(-1), weight_scale.reshape(-1)):
            check_shared_scale(a, as_scalar_scale(s, w.device, what="FP8 weight_scale"), E4M3_MAX, what="FP8",
                               scale_name="weight_scale")
    per_row = (weight_scale if weight_scale.ndim == 0
               else weight_scale.reshape(-1, 1).expand(-1, out_f).reshape(-1, 1))   # [] or [rows, 1]
    q = torch.empty(rows.shape, dtype=FP8_DTYPE, device=w.device)
    for r in row_chunks(rows.shape[0], in_f, w.device):
        scaled = weight_over_scale(rows[r], per_row if per_row.ndim == 0 else per_row[r], numerics)
        if shared:  # only a shared scale can push |scaled| past 448 (e4m3fn has no inf: NaN)
            scaled.clamp_(-E4M3_MAX, E4M3_MAX)
        q[r] = scaled.to(FP8_DTYPE)
    return q.reshape(w.shape), weight_scale


def dequantize_fp8(q: Tensor, weight_scale: Tensor, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """float8_e4m3fn [..., out, in] and an fp32 scale ([], broadcastable, or one per matrix [...])
    -> [..., out, in] in ``dtype``."""
    scale = weight_scale.to(device=q.device, dtype=torch.float32)
    if q.ndim > 2 and scale.ndim == q.ndim - 2 and scale.numel() > 1:   # one scale per matrix
        scale = scale[..., None, None]
    return (q.float() * scale).to(dtype)


def fp8_group_scale(weights: list[Tensor] | tuple[Tensor, ...], numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """One per-tensor FP8 scale for a fused group: from the max amax of its members."""
    return fp8_scale(torch.stack([abs_max(w).float() for w in weights]).max(), numerics)


def amax_over(amax: Tensor | float, divisor: float, zero_amax: float, *, what: str,
              numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """A per-tensor scale ``amax / divisor`` (fp32, amax's shape), ModelOpt's ``amax.float() /
    python_scalar`` as ``numerics`` computes it. A zero amax (a weight of zeros, a module that saw
    only zeros) becomes ``zero_amax``, as ModelOpt's ``export_amax`` does. A negative or non-finite
    amax raises `NumericsError` (for an input amax: a calibration bug)."""
    a = torch.as_tensor(amax, dtype=torch.float32)
    bad = ~torch.isfinite(a) | (a < 0)
    if bool(bad.any()):
        raise NumericsError(f"{what}: amax must be finite and >= 0, got {a[bad].flatten()[0].item()}")
    a = torch.where(a == 0, torch.full_like(a, zero_amax), a)
    return scalar_div(a, divisor, numerics)


def fp8_input_scale(amax: Tensor | float, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """Static FP8 activation scale ``amax / 448`` (a zero amax gives 1.0)."""
    return amax_over(amax, E4M3_MAX, E4M3_MAX, what="FP8 input", numerics=numerics)


def activation_scale(amax: Tensor | float, scheme: str, numerics: str = DEFAULT_NUMERICS) -> Tensor:
    """Static input scale of the registry scheme named ``scheme`` (any case: "NVFP4": amax/2688,
    "FP8": amax/448), fp32, amax's shape (`quantgate.exporter.schemes`)."""
    from quantgate.exporter.schemes import static_input_schemes

    schemes = static_input_schemes()
    entry = schemes.get(scheme.upper())
    if entry is None:
        known = ", ".join(sorted(schemes))
        raise NumericsError(f"no static activation scale for scheme {scheme!r}; known: {known}")
    assert entry.numerics.input_scale is not None
    return entry.numerics.input_scale(amax, numerics)
