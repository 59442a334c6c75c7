"""Shared checks and helpers for the number-format modules (pure torch, device agnostic).

Conventions used by every module in this package:
- Weights are ``[out, in]`` (the input dimension last, as ``nn.Linear`` stores them).
- Every helper works on whatever device its input lives on; constants are created on that device,
  because a CUDA tensor divided by a CPU scalar is computed as a multiplication by the reciprocal,
  which rounds differently from a true division (torch ``div_true_kernel_cuda``; on an H100,
  ``t / 2688.0`` differed from the CPU result in 6% of the bytes of 1M random floats). Our outputs
  are therefore byte-identical on CPU and CUDA, and equal to ModelOpt's on CPU (the fixtures);
  ModelOpt itself, run on CUDA, can land one ulp away on its ``amax / 2688`` global scales.
- Large weights are processed in row chunks so that fp32 temporaries stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from quantgate.validators.errors import QuantgateError

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)

# Row chunks hold about this many elements: on CPU small enough that the fp32 temporaries of one
# chunk stay in cache between the passes of the E2M1 encoder, on an accelerator large enough that
# kernel-launch overhead stays negligible (a 4096x14336 NVFP4 weight is 2 chunks on an H100).
CPU_CHUNK_ELEMS = 1 << 20
ACCEL_CHUNK_ELEMS = 1 << 25
# A shared (fused-group) scale is amax_group / divisor rounded to fp32, so it may undershoot a
# member's amax by an ulp; anything beyond this slack means the group was computed without it.
SHARED_SCALE_SLACK = 1.0 + 2.0**-10


class NumericsError(QuantgateError, ValueError):
    """A tensor cannot be quantized into the requested format (shape, dtype or values)."""


def check_weight(w: Tensor, *, what: str, in_divisor: int = 1) -> None:
    """Raise `NumericsError` unless ``w`` is a 2-D floating weight whose in dim divides ``in_divisor``."""
    if w.dtype not in FLOAT_DTYPES:
        raise NumericsError(
            f"{what}: weight dtype {w.dtype} is not supported; expected one of "
            f"{', '.join(str(d) for d in FLOAT_DTYPES)}"
        )
    if w.ndim != 2:
        raise NumericsError(f"{what}: expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise NumericsError(f"{what}: the weight is empty (shape {tuple(w.shape)})")
    if w.shape[1] % in_divisor != 0:
        raise NumericsError(
            f"{what}: in_features={w.shape[1]} is not divisible by {in_divisor}; "
            "exclude this module from quantization (keep it in the source dtype)"
        )


def require_finite(amax: Tensor, *, what: str) -> None:
    """Raise unless every entry of a (small) amax tensor is finite.

    ``amax`` propagates NaN and Inf, so checking the reduced tensor checks the weight without
    another pass over it. This is the one host synchronisation of a quantize call.
    """
    bad = int((~torch.isfinite(amax)).sum().item())
    if bad:
        raise NumericsError(
            f"{what}: the weight contains NaN or Inf values ({bad} of {amax.numel()} groups "
            "affected); fix the source checkpoint or exclude this module"
        )


def as_scalar_scale(scale: Tensor | float, device: torch.device, *, what: str) -> Tensor:
    """A caller-supplied per-tensor scale as a 0-d fp32 tensor on ``device``; must be finite and > 0."""
    s = torch.as_tensor(scale, dtype=torch.float32).to(device)
    if s.numel() != 1:
        raise NumericsError(f"{what}: expected a single per-tensor scale, got shape {tuple(s.shape)}")
    s = s.reshape(())
    value = float(s.item())
    if not (value > 0.0 and value != float("inf")):
        raise NumericsError(f"{what}: scale must be finite and > 0, got {value}")
    return s


def check_shared_scale(amax: Tensor, scale: Tensor, divisor: float, *, what: str, scale_name: str) -> None:
    """Raise unless a caller-supplied shared scale covers this weight: amax <= divisor * scale
    (up to SHARED_SCALE_SLACK). ``amax`` and ``scale`` are 0-d fp32; ``divisor`` is the format's
    largest representable magnitude per unit of scale (448 for FP8, 2688 for NVFP4)."""
    ratio = float((amax / (divisor * scale)).item())
    if ratio > SHARED_SCALE_SLACK:
        raise NumericsError(
            f"{what}: the shared {scale_name} is too small for this weight (max|w| is {ratio:.4g}x "
            f"{divisor:g} * {scale_name}); compute it from the max amax over the whole fused group"
        )


def abs_max(x: Tensor, *, last_dim: bool = False) -> Tensor:
    """max |x| over the last dim (``last_dim``) or over all elements, in x's dtype.

    Row-chunked, so ``|x|`` never exists whole (on a 2-thread CPU this is also ~2x faster than
    ``aminmax`` over 16-element blocks). x [rows, ...] -> [rows, ...] without the last dim, or [].
    """
    chunks = row_chunks(x.shape[0], x[0].numel(), x.device)
    if last_dim:
        return torch.cat([x[rows].abs().amax(dim=-1) for rows in chunks])
    return torch.stack([x[rows].abs().amax() for rows in chunks]).amax()


def row_chunks(rows: int, cols: int, device: torch.device) -> Iterator[slice]:
    """Slices over the rows of a ``[rows, cols]`` tensor, each about one chunk of elements."""
    budget = CPU_CHUNK_ELEMS if device.type == "cpu" else ACCEL_CHUNK_ELEMS
    step = max(1, budget // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def true_div(x: Tensor, divisor: float, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """``x / divisor`` as a true IEEE division in ``dtype`` on any device (see module docstring)."""
    return x.to(dtype) / torch.tensor(divisor, dtype=dtype, device=x.device)
